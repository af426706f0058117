"""ONNX export of a run's forward() (the ONNX Runtime runner is kdad.deploy.runner.OnnxRunner).

The graph is exactly `Model.forward(images01)`: encoder (with its mean/std normalisation), student, and
the anomaly-map head (resize, fuse, Gaussian blur, max score). It outputs raw maps and scores; thresholds
and the overlay colour range live in a JSON file beside the graph (<name>.json), so they can be edited
without re-exporting (anomalib #3033). The pre-processing contract is written there too (#2672, #3726).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kdad import __version__
from kdad.data.transforms import input_contract as shared_input_contract
from kdad.errors import KdadError, require_extra
from kdad.fileio import atomic_write_bytes, atomic_write_text
from kdad.methods.base import teacher_of

DEFAULT_OPSET = 17
METADATA_FORMAT = "kdad-onnx/1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "score")
PARITY_TOLERANCE = 1e-4


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def metadata_path(onnx_path: str | Path) -> Path:
    """The metadata file that belongs to a graph: model.onnx -> model.json."""
    return Path(onnx_path).with_suffix(".json")


def input_contract(image_size: int, model: nn.Module | None = None) -> dict[str, Any]:
    """The shared input contract plus the graph's own mean/std (informational: they are in the graph)."""
    contract = shared_input_contract(image_size)
    contract["name"] = INPUT_NAME
    teacher: Any = teacher_of(model) if model is not None else None
    if teacher is not None and hasattr(teacher, "mean"):
        contract["normalization_in_graph"] = {"mean": list(teacher.mean), "std": list(teacher.std)}
    return contract


def _failing_component(model: nn.Module, exc: BaseException) -> str:
    """Name of the innermost submodule of `model` whose code was running when `exc` was raised."""
    names = {id(m): n for n, m in model.named_modules()}
    found = ""
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)] or "(model)"
    return found


def _child_inputs(module: nn.Module, args: tuple[Any, ...]) -> dict[str, tuple[Any, ...]]:
    """Positional inputs each direct child receives during one forward of `module` on `args`."""
    seen: dict[str, tuple[Any, ...]] = {}
    hooks = [
        child.register_forward_pre_hook(lambda _m, a, n=name: seen.setdefault(n, a))
        for name, child in module.named_children()
    ]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _locate_conversion_failure(model: nn.Module, example: torch.Tensor, opset: int, depth: int = 4) -> str:
    """Export children one by one (with the inputs they saw) and descend into the first that fails.

    Errors raised while converting a traced graph carry no Python frame, so this finds the component.
    """
    module, args, path = model, (example,), ""
    for _ in range(depth):
        failing = ""
        for name, child_args in _child_inputs(module, args).items():
            child = module.get_submodule(name)
            try:
                with warnings.catch_warnings(), torch.no_grad():
                    warnings.simplefilter("ignore")
                    torch.onnx.export(
                        child,
                        child_args,
                        io.BytesIO(),  # type: ignore[arg-type]
                        opset_version=opset,
                        dynamo=False,
                    )
            except Exception:  # noqa: BLE001  # any failure marks the child to descend into
                failing, module, args = name, child, child_args
                break
        if not failing:
            break
        path = f"{path}.{failing}" if path else failing
    return path or "(model)"


def _export_torchscript(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    buf = io.BytesIO()
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAMES[0]: {0: "batch"}, OUTPUT_NAMES[1]: {0: "batch"}}
    with warnings.catch_warnings():
        # The legacy exporter warns about its own deprecation and about Python ints in timm's "SAME"
        # padding; both are harmless here because H and W are fixed (only the batch axis is dynamic).
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            buf,  # type: ignore[arg-type]  # file objects work
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    return buf.getvalue()


def _export_dynamo(model: nn.Module, example: torch.Tensor, opset: int) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},),
            opset_version=opset,
            dynamo=True,
        )
    fd, tmp = tempfile.mkstemp(suffix=".onnx")
    os.close(fd)
    try:
        program.save(tmp)  # type: ignore[union-attr]
        return Path(tmp).read_bytes()
    finally:
        Path(tmp).unlink(missing_ok=True)


def export_model_bytes(
    model: nn.Module, image_size: int, opset: int = DEFAULT_OPSET, exporter: str = "auto"
) -> tuple[bytes, str]:
    """Export `model.forward` (B, 3, S, S) in [0, 1] -> (anomaly_map (B,1,S,S), score (B,)) to ONNX bytes.

    exporter: "torchscript" (legacy `dynamo=False`), "dynamo", or "auto" (torchscript, else dynamo).
    Returns (graph bytes, exporter used). Raises KdadError naming the component that failed.
    """
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise KdadError(f"unknown exporter {exporter!r}; valid: auto, torchscript, dynamo")
    require_extra("onnx", ("onnx",), "ONNX export")
    model = model.eval().cpu()
    example = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    tries = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    for name in tries:
        fn = _export_torchscript if name == "torchscript" else _export_dynamo
        try:
            with torch.no_grad():
                return fn(model, example, opset), name
        except ImportError as e:  # the dynamo exporter needs the onnxscript package
            errors.append(f"{name} exporter unavailable: {e}")
        except TypeError as e:  # a torch without the legacy exporter rejects dynamo=False / dynamic_axes
            errors.append(f"{name} exporter unavailable in torch {torch.__version__}: {e}")
        except Exception as e:  # noqa: BLE001  # exporter errors have many types; all are reported
            where = _failing_component(model, e)
            if not where and name == "torchscript":
                try:
                    where = _locate_conversion_failure(model, example, opset)
                except Exception:  # noqa: BLE001  # best effort; the original error is what matters
                    where = "(unknown component)"
            where = where or "(unknown component)"
            kind = "" if where.startswith("(") else f" ({type(model.get_submodule(where)).__name__})"
            first_line = (str(e).splitlines() or [""])[0]
            errors.append(
                f"{name} exporter failed in component {where!r}{kind}: {type(e).__name__}: {first_line}"
            )
            if isinstance(e, KdadError):  # the model refused (missing state): no exporter helps
                break
    raise KdadError(
        f"ONNX export of {type(model).__module__}.{type(model).__name__} (opset {opset}) failed: "
        + "; ".join(errors)
    )


def check_parity(
    model: nn.Module, graph: bytes, image_size: int, batches: tuple[int, ...] = (1, 3)
) -> dict[str, Any]:
    """Run the graph in ONNX Runtime (CPU) and the model in PyTorch on fixed random batches of each size
    (sizes other than the export example's 2 prove the dynamic batch axis).

    Returns {"max_abs_map_diff", "max_abs_score_diff", "batches"}; raises KdadError above PARITY_TOLERANCE.
    """
    session = _session(graph, "<exported graph>")
    map_diff = score_diff = 0.0
    for batch in batches:
        x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            out = model.eval().cpu()(x)
        amap, score = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x.numpy()})
        map_diff = max(map_diff, float(np.abs(amap - out.anomaly_map.numpy()).max()))
        score_diff = max(score_diff, float(np.abs(score - out.score.numpy()).max()))
    res = {
        "max_abs_map_diff": map_diff,
        "max_abs_score_diff": score_diff,
        "batches": list(batches),
        "input": "uniform random in [0, 1]",
    }
    if map_diff > PARITY_TOLERANCE:
        raise KdadError(
            f"exported graph differs from PyTorch: max |map diff| {map_diff:.3g} "
            f"> {PARITY_TOLERANCE} on a random batch"
        )
    return res


def default_onnx_path(run: str | Path) -> Path:
    """RUN/model.onnx for a run folder, X.onnx for a checkpoint file X.ckpt."""
    p = Path(run)
    return p / "model.onnx" if p.is_dir() else p.with_suffix(".onnx")


def export_onnx(
    run: str | Path,
    out: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    check: bool = True,
) -> Path:
    """Export a run (folder with model.ckpt, or a .ckpt) to ONNX + metadata JSON; returns the graph path."""
    from kdad.checkpoint import load_bundle, model_from_bundle

    require_extra("onnx", ("onnx", "onnxruntime") if check else ("onnx",), "ONNX export")
    ckpt = Path(run) / "model.ckpt" if Path(run).is_dir() else Path(run)
    bundle = load_bundle(ckpt)
    model, cfg = model_from_bundle(bundle)
    out_path = Path(out) if out else default_onnx_path(run)
    if out_path.suffix != ".onnx":
        raise KdadError(f"--out must end in .onnx (the metadata goes beside it as .json), got {out_path}")
    size = int(cfg.data.image_size)
    graph, used = export_model_bytes(model, size, opset, exporter)
    meta = build_metadata(model, cfg.method, size, bundle, used, opset, graph, ckpt)
    if check:
        meta["parity_check"] = check_parity(model, graph, size)
    if bundle.get("gate") is not None:
        meta["gate"] = _export_gate(model, bundle["gate"], size, opset, out_path, check)
    atomic_write_bytes(out_path, graph)
    atomic_write_text(metadata_path(out_path), json.dumps(meta, indent=2) + "\n")
    return out_path


def build_metadata(
    model: nn.Module,
    method: str,
    image_size: int,
    bundle: dict[str, Any],
    exporter: str,
    opset: int,
    graph: bytes,
    checkpoint: Path | None,
) -> dict[str, Any]:
    """The <name>.json written beside the graph (plain JSON; thresholds are editable by hand)."""
    from kdad.align import AlignSpec
    from kdad.config import DataConfig, from_dict
    from kdad.tiling import TileSpec

    thr = dict(bundle.get("thresholds") or {})
    disp = dict(bundle.get("display") or {})
    data = (bundle.get("config") or {}).get("data")
    data_cfg = from_dict(DataConfig, data, "checkpoint config.data")
    tiles, align = TileSpec.from_data(data_cfg), AlignSpec.from_data(data_cfg)
    return {
        "format": METADATA_FORMAT,
        "method": method,
        "image_size": image_size,
        "input": input_contract(image_size, model),
        "outputs": {
            OUTPUT_NAMES[0]: {
                "shape": ["batch", 1, image_size, image_size],
                "dtype": "float32",
                "meaning": "raw per-pixel anomaly (higher = more anomalous)",
            },
            OUTPUT_NAMES[1]: {
                "shape": ["batch"],
                "dtype": "float32",
                "meaning": "raw image score = max of anomaly_map",
            },
        },
        "thresholds": threshold_metadata(thr),
        # the calibration normals' image scores (sorted): what the service measures drift against
        "calibration": bundle.get("calibration"),
        # the graph is per tile; runners stitch full images with kdad.tiling when this is set
        "tiling": None if tiles is None else tiles.to_dict(),
        # the graph sees aligned images; runners align them and warp the map back with kdad.align when this is set
        "align": None if align is None else align.to_dict(),
        "display": {"vmin": disp.get("vmin"), "vmax": disp.get("vmax")},
        "kdad_version": __version__,
        "torch_version": torch.__version__,
        "exporter": exporter,
        "opset": opset,
        "graph_sha256": hashlib.sha256(graph).hexdigest(),
        "source_checkpoint": {
            "path": str(checkpoint) if checkpoint else None,
            "sha256": sha256_file(checkpoint) if checkpoint else None,
        },
    }


GATE_OUTPUT = "gate_score"


def gate_path(onnx_path: str | Path) -> Path:
    """X.gate.onnx beside X.onnx: the invalid-input gate's graph (teacher + pooled-feature Mahalanobis)."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".gate.onnx")


def _export_gate(model: nn.Module, stored: dict[str, Any], size: int, opset: int, out_path: Path,
                 check: bool) -> dict[str, Any]:
    """Write the gate's own graph beside `out_path` (images01 -> gate_score (B,)) and return the metadata's
    ``gate`` entry: the thresholds, the graph's name and hash, and the parity with torch when `check`."""
    from kdad.gate import Gate

    module = Gate.from_bundle(stored).module(model).eval()
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), buf,  # type: ignore[arg-type]
                          input_names=[INPUT_NAME], output_names=[GATE_OUTPUT],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, GATE_OUTPUT: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    graph = buf.getvalue()
    entry = {**Gate.from_bundle(stored).metadata(), "graph": gate_path(out_path).name,
             "graph_sha256": hashlib.sha256(graph).hexdigest()}
    if check:
        with torch.inference_mode():
            ref = module(example).numpy()
        got = _session(graph, "the gate graph").run([GATE_OUTPUT], {INPUT_NAME: example.numpy()})[0]
        entry["parity_max_rel_diff"] = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-6)))
    atomic_write_bytes(gate_path(out_path), graph)
    return entry


def threshold_metadata(thr: dict[str, Any]) -> dict[str, Any]:
    """The metadata's thresholds: image, pixel, source, min_area, and the conformal alpha, n and guarantee
    (None for bundles with a quantile threshold, written before conformal thresholds)."""
    from kdad.thresholds import conformal_guarantee

    alpha, n_cal = thr.get("alpha"), thr.get("n_calibration")
    return {"image": thr.get("image"), "pixel": thr.get("pixel"), "source": thr.get("source"),
            "min_area": int(thr.get("min_area", 1)), "alpha": alpha, "n_calibration": n_cal,
            "guarantee": None if alpha is None or n_cal is None else conformal_guarantee(float(alpha), int(n_cal))}


def _session(graph: bytes | str, where: str, providers: list[str] | None = None) -> Any:
    require_extra("onnx", ("onnxruntime",), "ONNX inference")
    import onnxruntime as ort

    try:
        return ort.InferenceSession(graph, providers=providers or ["CPUExecutionProvider"])
    except Exception as e:
        raise KdadError(f"onnxruntime cannot load {where}: {e}") from e


def read_metadata(onnx_path: str | Path) -> dict[str, Any]:
    """Load and validate the metadata JSON beside a graph; errors name the file."""
    mpath = metadata_path(onnx_path)
    if not mpath.is_file():
        raise KdadError(
            f"metadata file {mpath} for {onnx_path} is missing; re-run `kdad export` "
            "(the graph alone does not say its image size, thresholds or input contract)"
        )
    try:
        meta = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KdadError(f"cannot read metadata {mpath}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != METADATA_FORMAT:
        raise KdadError(f"{mpath} is not kdad ONNX metadata (expected format {METADATA_FORMAT!r})")
    for key in ("method", "image_size", "thresholds", "input"):
        if key not in meta:
            raise KdadError(f"metadata {mpath} lacks the key {key!r}")
    return meta
