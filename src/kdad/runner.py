"""Old home of TorchRunner: see kdad.deploy.runner."""

from kdad.deploy.runner import OnnxRunner, Runner, TorchRunner

__all__ = ["OnnxRunner", "Runner", "TorchRunner"]
