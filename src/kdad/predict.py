"""Old home of `kdad predict`: see kdad.deploy.predict and kdad.deploy.runner."""

from kdad.deploy.predict import run_predict
from kdad.deploy.runner import make_runner

__all__ = ["make_runner", "run_predict"]
