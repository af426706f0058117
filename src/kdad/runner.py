"""Inference runners: a loaded bundle behind one call images01 (B,3,H,W) -> (maps (B,H,W), scores (B,))."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdad.checkpoint import load_bundle, model_from_bundle
from kdad.data.transforms import input_contract
from kdad.errors import ConfigError
from kdad.thresholds import finite_threshold
from kdad.seed import resolve_device


class TorchRunner:
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
            from kdad.speed import optimize_for_inference

            self.forward = optimize_for_inference(self.model, self.device, precision=precision, inplace=True,
                                                  image_size=int(self.cfg.data.image_size), compile=compile,
                                                  cuda_graph=cuda_graph)
        elif compile or cuda_graph:
            raise ConfigError("compile and cuda_graph need precision 'fp32' or 'bf16', not 'exact'")
        thr: dict[str, Any] = self.bundle.get("thresholds") or {}
        finite_threshold(image_threshold, "image_threshold")  # NaN would call every image normal
        self.image_threshold: float | None = image_threshold if image_threshold is not None else thr.get("image")
        self.pixel_threshold: float | None = thr.get("pixel")
        self.pixel_min_area = int(thr.get("min_area", 1))  # masks keep regions of at least this many pixels
        self.image_size = int(self.cfg.data.image_size)
        disp = self.bundle.get("display") or {}
        self.vmin = float(disp.get("vmin", 0.0))
        self.vmax = float(disp.get("vmax", (self.pixel_threshold or 1.0) * 2))

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
