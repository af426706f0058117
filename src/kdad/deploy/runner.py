"""Inference runners: a trained model behind one call images01 (B, 3, H, W) in [0, 1] -> (maps (B, H, W),
scores (B,)) as numpy float32, with its stored post-processing (`runner.post`).

Three backends share the `Runner` protocol: eager PyTorch (`TorchRunner`, precision "exact"), the fast path
(`TorchRunner` with precision "fp32"/"bf16", kdad.deploy.fast) and ONNX Runtime (`OnnxRunner`).
`make_runner` picks one for a checkpoint, a run folder or an exported graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kdad.align import runner_views
from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.data.transforms import input_contract
from kdad.deploy.postprocess import PostProcess
from kdad.errors import ConfigError, KdadError
from kdad.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    _session,
    default_onnx_path,
    metadata_path,
    read_metadata,
    sha256_file,
)
from kdad.seed import resolve_device
from kdad.thresholds import finite_threshold


@runtime_checkable
class Runner(Protocol):
    """What predict, evaluation (`kdad test --backend`), tiling and the web service call."""

    image_size: int
    post: PostProcess

    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]: ...

    def info(self) -> dict[str, Any]: ...


class _Thresholded:
    """The post-processing values under their old runner attribute names (read by tiling and the service)."""

    post: PostProcess

    @property
    def image_threshold(self) -> float | None:
        return self.post.image_threshold

    @property
    def pixel_threshold(self) -> float | None:
        return self.post.pixel_threshold

    @property
    def pixel_min_area(self) -> int:
        return self.post.min_area

    @property
    def vmin(self) -> float:
        return self.post.vmin

    @property
    def vmax(self) -> float:
        return self.post.vmax


class TorchRunner(_Thresholded):
    """Eager PyTorch inference of a checkpoint bundle (the same forward() that evaluation uses)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto", image_threshold: float | None = None,
                 precision: str = "exact", compile: bool = False, cuda_graph: bool = False) -> None:
        """precision: "exact" (eager fp32 forward, what evaluation and export use) or the fast path of
        kdad.speed ("fp32": BN folding, matrix map head, channels_last, equal within 1e-5; "bf16": also bf16
        autocast for the network, faster on AVX-512-BF16 CPUs and GPUs, with a measurable map error).
        compile / cuda_graph: the fast path's torch.compile and CUDA-graph levers (not with "exact")."""
        self.bundle = load_bundle(checkpoint)
        self.model, self.cfg = model_from_bundle(self.bundle)
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.precision = precision
        self.compile, self.cuda_graph = compile, cuda_graph
        self.forward: Any = self.model
        if precision != "exact":
            from kdad.deploy.fast import optimize_for_inference

            self.forward = optimize_for_inference(self.model, self.device, precision=precision, inplace=True,
                                                  image_size=int(self.cfg.data.image_size), compile=compile,
                                                  cuda_graph=cuda_graph)
        elif compile or cuda_graph:
            raise ConfigError("compile and cuda_graph need precision 'fp32' or 'bf16', not 'exact'")
        gate = self.bundle.get("gate")
        self.post = PostProcess.from_thresholds(self.bundle.get("thresholds"), self.bundle.get("display"),
                                                image_threshold, gate=gate)
        self.image_size = int(self.cfg.data.image_size)
        self.gate: Any = None
        if gate is not None:
            from kdad.gate import Gate

            self.gate = Gate.from_bundle(gate).module(self.model).to(self.device).eval()

    @torch.inference_mode()
    def gate_scores(self, images01: torch.Tensor) -> np.ndarray | None:
        """The invalid-input gate's scores (B,) (kdad.gate), None without a stored gate."""
        if self.gate is None:
            return None
        return self.gate(images01.to(self.device).float()).float().cpu().numpy()

    @torch.inference_mode()
    def __call__(self, images01: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        out = self.forward(images01.to(self.device))
        return out.anomaly_map[:, 0].float().cpu().numpy(), out.score.float().cpu().numpy()

    def info(self) -> dict[str, Any]:
        """Model facts for humans and the web service."""
        return {"method": self.cfg.method, "image_size": self.image_size, "image_threshold": self.image_threshold,
                "pixel_threshold": self.pixel_threshold, "backend": "torch", "device": str(self.device),
                "precision": self.precision, "compile": self.compile, "cuda_graph": self.cuda_graph,
                "input_contract": input_contract(self.image_size)}


class OnnxRunner(_Thresholded):
    """ONNX Runtime inference, TorchRunner's interface: images01 (B,3,S,S) -> (maps (B,S,S), scores (B,))."""

    def __init__(
        self,
        path: str | Path,
        image_threshold: float | None = None,
        providers: list[str] | None = None,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise KdadError(f"ONNX graph not found: {self.path}")
        self.meta = read_metadata(self.path)
        if verify and self.meta.get("graph_sha256") and sha256_file(self.path) != self.meta["graph_sha256"]:
            raise KdadError(
                f"{self.path} does not match its metadata {metadata_path(self.path)} (graph_sha256 "
                "differs); the graph was replaced after export, re-run `kdad export`"
            )
        self.session = _session(str(self.path), str(self.path), providers)
        self.image_size = int(self.meta["image_size"])
        self._check_graph_io()
        gate = self.meta.get("gate")
        self.post = PostProcess.from_thresholds(self.meta.get("thresholds"), self.meta.get("display"),
                                                image_threshold, gate=gate)
        self.gate_session: Any = None
        if gate is not None:
            gpath = self.path.with_name(str(gate["graph"]))
            if not gpath.is_file():
                raise KdadError(f"{self.path}: its metadata names the gate graph {gpath}, which is missing; "
                                "re-run `kdad export`")
            if verify and gate.get("graph_sha256") and sha256_file(gpath) != gate["graph_sha256"]:
                raise KdadError(f"{gpath} does not match the metadata's gate graph_sha256; re-run `kdad export`")
            self.gate_session = _session(str(gpath), str(gpath), providers)

    def gate_scores(self, images01: torch.Tensor | np.ndarray) -> np.ndarray | None:
        """The invalid-input gate's scores (B,) from the gate graph, None without one."""
        if self.gate_session is None:
            return None
        x = images01.detach().cpu().numpy() if isinstance(images01, torch.Tensor) else np.asarray(images01)
        return self.gate_session.run(["gate_score"], {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def _check_graph_io(self) -> None:
        inputs = self.session.get_inputs()
        outs = [o.name for o in self.session.get_outputs()]
        shape = list(inputs[0].shape) if inputs else []
        if (
            len(inputs) != 1
            or inputs[0].name != INPUT_NAME
            or shape[1:] != [3, self.image_size, self.image_size]
            or sorted(outs) != sorted(OUTPUT_NAMES)
        ):
            raise KdadError(
                f"{self.path}: graph inputs/outputs {[(i.name, i.shape) for i in inputs]} -> {outs} do "
                f"not match metadata (input {INPUT_NAME!r} [batch, 3, {self.image_size}, "
                f"{self.image_size}], outputs {list(OUTPUT_NAMES)})"
            )

    def __call__(self, images01: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images in [0, 1], float32 (B, 3, S, S) -> maps (B, S, S) and scores (B,) as numpy float32."""
        x = images01.detach().cpu().numpy() if isinstance(images01, torch.Tensor) else np.asarray(images01)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, self.image_size, self.image_size):
            raise KdadError(
                f"{self.path} expects (B, 3, {self.image_size}, {self.image_size}) float32 in [0, 1], "
                f"got shape {tuple(x.shape)}"
            )
        amap, score = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return amap[:, 0], score

    def info(self) -> dict[str, Any]:
        """Model facts for humans and the web service (same keys as TorchRunner.info)."""
        return {
            "method": self.meta["method"],
            "image_size": self.image_size,
            "image_threshold": self.image_threshold,
            "pixel_threshold": self.pixel_threshold,
            "backend": "onnxruntime",
            "device": ",".join(self.session.get_providers()),
            "input_contract": self.meta["input"],
            "exporter": self.meta.get("exporter"),
            "opset": self.meta.get("opset"),
            "kdad_version": self.meta.get("kdad_version"),
            "graph": str(self.path),
        }


def make_runner(model_path: str | Path, backend: str | None, device: str = "auto",
                threshold: float | None = None, precision: str = "exact", compile: bool = False,
                cuda_graph: bool = False) -> Any:
    """TorchRunner for checkpoints, OnnxRunner for .onnx graphs (or when backend='onnx').

    With backend='onnx' a run folder or checkpoint means its exported graph (RUN/model.onnx, X.onnx).
    A model trained with data.tiling comes wrapped in a kdad.tiling.TiledRunner (stitched full-size maps), one
    trained with data.align in a kdad.align.AlignedRunner (maps warped back onto the input).
    """
    finite_threshold(threshold, "--threshold")
    path = Path(model_path)
    if backend not in (None, "torch", "onnx"):
        raise KdadError(f"unknown backend {backend!r}; valid: torch, onnx")
    wanted = [flag for flag, on in (("--compile", compile), ("--cuda-graph", cuda_graph)) if on]
    if wanted and precision == "exact":
        raise ConfigError(f"{' and '.join(wanted)} need the fast path: add --precision fp32 or --precision bf16")
    if wanted and (backend == "onnx" or path.suffix == ".onnx"):
        raise ConfigError(f"{' and '.join(wanted)} apply to the torch backend only, not to ONNX graphs")
    if path.suffix == ".onnx" and backend == "torch":
        raise KdadError(f"{path} is an ONNX graph; use --backend onnx, or the run folder / .ckpt for torch")
    if backend == "onnx" or path.suffix == ".onnx":
        if path.suffix != ".onnx":
            graph = default_onnx_path(path)
            if not graph.is_file():
                raise KdadError(f"no exported graph {graph} for {path}; run `kdad export {path}` first")
            path = graph
        return runner_views(OnnxRunner(path, image_threshold=threshold))
    return runner_views(TorchRunner(path, device=device, image_threshold=threshold, precision=precision,
                                    compile=compile, cuda_graph=cuda_graph))
