"""Run configuration: dataclasses, YAML presets, files and `--set key=value` overrides.

Precedence (lowest to highest): dataclass defaults < preset < config file(s) < --set overrides.
Each step is a plain dict merge; the result becomes dataclasses through a strict `from_dict` that
rejects unknown keys and wrong types with the source, the key path and the valid keys.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from kdad.dicts import deep_merge, from_dict, to_dict
from kdad.errors import ConfigError
from kdad.formats import DataFormat

AmpDtype = Literal["bf16", "fp16"]
Select = Literal["last", "val_map_mean"]
PixelThresholdRule = Literal["region", "quantile"]
AlignMode = Literal["none", "axis", "auto"]  # kdad.align.ALIGN_MODES
AlignRegion = Literal["frame", "part"]  # kdad.align.ALIGN_REGIONS
ImageThresholdRule = Literal["conformal", "quantile"]


@dataclass
class DataConfig:
    """Where the images are and how they are read."""

    root: str = ""  # MVTec-layout category folder (train/, test/, ground_truth/)
    format: DataFormat = "mvtec"  # one of kdad.formats.FORMATS (docs/datasets.md)
    category: str = ""  # name used in reports (defaults to the root's folder name)
    # multi-class: one model over these (names under root, or paths)
    categories: list[str] = field(default_factory=list)
    balanced: bool = True  # multi-class: sample every category equally often whatever its size
    image_size: int = 256  # model input side; with tiling, the tile side
    tiling: bool = False  # read images at native size (or tile_resolution) and cut image_size tiles (docs/tiling.md)
    tile_overlap: float = 0.25  # fraction of the tile shared with its neighbour; maps are averaged there
    tile_resolution: int = 0  # 0 = native size; else the long side the full image is resized to first
    tile_metric_size: int = 1024  # stitched maps with a longer side are area-pooled for pixel metrics; 0 = never
    tile_score_top: float = 0.0  # image score = mean of this share of the stitched map's top pixels; 0 = its max
    # "axis": turn each image so the part's long axis is horizontal; "auto": fit picks axis or none from the
    # training images and stores its pick (docs/align.md)
    align: AlignMode = "none"
    align_zoom: float = 1.0  # with align: the part's zoom about its centre in the aligned frame
    # with align: > 0 makes fit set align_zoom so that the longest part of the training images it measures spans
    # this share of the image side (0 = keep align_zoom); fit stores the zoom and sets this back to 0
    align_fill: float = 0.0
    # with align: "part" keeps the map (and takes the image score) on the part's envelope only, the aligned-frame
    # pixels where the training parts lie (kdad.align.ENVELOPE_SHARE); "frame" keeps the whole aligned view
    # (docs/align.md, "Dust on the backdrop")
    align_region: AlignRegion = "frame"
    align_envelope: str = ""  # written by fit with align_region=part: the envelope (kdad.align.encode_mask)
    good_dir: str = ""  # folder format: normal images
    bad_dir: str = ""  # folder format: defective test images
    mask_dir: str = ""  # folder format: masks matched by file stem
    test_good_dir: str = ""  # folder format: normal test images
    texture_dir: str = ""  # texture source for anomaly synthesis (DTD layout)
    num_workers: int = 0
    split_file: str = ""  # visa: split CSV (default split_csv/1cls.csv); realiad: JSON or its folder
    view: str = ""  # realiad: cameras to use, e.g. "C1" or "C1,C3" (empty = all five)
    allow_missing_masks: bool = False  # test defective images that have no mask (image metrics only)
    val_split: str = ""  # a split of held-out normals for thresholds/selection, e.g. "validation" (mvtec_ad2)


@dataclass
class TrainConfig:
    """How the engine trains: budget, batch, device, checkpoints, selection."""

    epochs: int = 200
    max_iters: int = 0  # >0 stops after this many training batches (a CPU budget); 0 = epochs only
    max_seconds: float = 0.0  # >0 also stops once this much training wall time has passed
    batch_size: int = 16
    seed: int = 111
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    amp: bool = True  # autocast on GPU in train.amp_dtype (the *_paper presets set the official codes' precision)
    # "bf16" | "fp16" (fp16: a GradScaler scales the loss; methods listed in docs/design.md)
    amp_dtype: AmpDtype = "bf16"
    # bf16 autocast on CPU (AVX-512-BF16: about 2x faster training, see docs/benchmarks.md); "auto": bf16 only where
    # the CPU has it in hardware (AVX-512 BF16 or AMX), fp32 elsewhere, where bf16 is emulated and 20x slower or more
    cpu_bf16: bool | Literal["auto"] = False
    # CPU threads of the run (torch.set_num_threads, restored afterwards); 0 = torch's default, every core. The
    # thread count changes the rounding, so a seed trains to another model on another count (docs/quality.md,
    # "Session 34"); 1 is how the quality study trains (docs/design.md, "Engine")
    threads: int = 0
    channels_last: bool = True  # NHWC weights and batches (oneDNN / cuDNN NHWC kernels); same math
    fused_optimizer: bool = True  # fused Adam/AdamW/SGD kernels where torch has them; same update rule
    compile: bool = False  # torch.compile each top-level submodule; pays 20-60 s of compile time first
    heap_allocator: bool = True  # CPU + glibc: recycle big tensors on the heap while training (kdad.speed)
    # CUDA: replay each training step as one captured graph (RD, STFPM); drops the last partial batch
    cuda_graph: bool = False
    # under torchrun: BatchNorm statistics over the global batch (N ranks x batch_size), not each rank's own
    sync_batchnorm: bool = False
    # normal training images held out for selection and thresholds (the calibration set, docs/operating_point.md)
    val_fraction: float = 0.1
    select: Select = "last"  # "last" | "val_map_mean" (STFPM: lowest mean map on held-out normals)
    val_every: int = 1  # epochs between held-out evaluations when select != last
    ckpt_every: int = 1  # epochs between checkpoints (last.ckpt is overwritten atomically)
    # "conformal" (default): the split-conformal threshold bounding the false-alarm rate of normal images by
    # `alpha`; "quantile": the threshold_quantile of the held-out normal scores (kdad before 0.x)
    image_threshold_rule: ImageThresholdRule = "conformal"
    alpha: float = 0.01  # image_threshold_rule "conformal": the false-alarm rate to guarantee on normal images
    # methods whose map statistics come from the held-out normals (MethodSpec.calibrate: PatchST, DSKD, BKD, and
    # model.map_norm=position of RD, RD++, STFPM): score each half of them with statistics from the other half for
    # the image threshold, so no calibration image is divided by statistics that include itself
    # (docs/operating_point.md)
    crossfit_calibration: bool = True
    # the invalid-input gate (kdad.gate, docs/operating_point.md): images unlike the training normals are
    # called `invalid`, not normal; gate_alpha: its conformal rate on held-out normals; gate_margin: the factor
    # on that threshold (8: on bottle, defects reach 6.4x the highest held-out normal, other products >= 26x)
    gate: bool = True
    gate_alpha: float = 0.005
    gate_margin: float = 8.0
    threshold_quantile: float = 0.99  # image_threshold_rule "quantile": this quantile of the normal scores
    pixel_threshold_quantile: float = 0.999  # pixel_threshold_rule "quantile": this quantile of normal pixels
    # "region" (default): the pixel threshold at which at most pixel_region_rate of the held-out normal images
    # show any flagged region of pixel_min_area pixels or more (at image_size); masks drop smaller regions
    pixel_threshold_rule: PixelThresholdRule = "region"
    pixel_region_rate: float = 0.05
    pixel_min_area: int = 16
    eval_batch_size: int = 16
    progress: bool = True
    # the fraction of the epochs after which every optimizer's learning rate falls along a half cosine to near 0
    # at the last epoch (kdad.train.lr_factor); 1.0 = no decay (each method's own rate). A schedule over
    # train.epochs (or the epochs train.max_iters allows), not over train.max_seconds
    lr_decay_from: float = 1.0
    # flips / rotations of the normal training batches, drawn per image (kdad.augment; docs/design.md):
    # for products seen at any orientation; off by default (on an aligned product a turned part is a defect)
    augment: list[str] = field(default_factory=list)
    augment_angle: float = 180.0  # "rotate": the largest |angle|, degrees


@dataclass
class RunConfig:
    """Everything a run needs; `model` holds the method's own Config fields as a dict."""

    method: str = "rd"
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model: dict[str, Any] = field(default_factory=dict)


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in kdad/presets."""
    return sorted(p.name[:-5] for p in resources.files("kdad.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors naming the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    return data


# Renamed presets, old name -> new name. The old name still loads, with a FutureWarning (shown to CLI users by
# default) that names the new one; a shipped preset's `base:` may still use an old name, silently.
PRESET_ALIASES: dict[str, str] = {
    "snl_paper": "snl_abstract",  # SNL is kdad's design from the paper's abstract, not the paper's method
}


def read_preset(name: str, _warn: bool = True) -> dict[str, Any]:
    """A shipped preset by name (see `kdad list`); a deprecated alias warns and loads its new name."""
    if name in PRESET_ALIASES:
        if _warn:
            warnings.warn(f"preset {name!r} is deprecated and will be removed: use {PRESET_ALIASES[name]!r}",
                          FutureWarning, stacklevel=2)
        name = PRESET_ALIASES[name]
    names = list_presets()
    if name not in names:
        raise ConfigError(f"unknown preset {name!r}; valid presets: {names}")
    data = yaml.safe_load(resources.files("kdad.presets").joinpath(f"{name}.yaml").read_text()) or {}
    parent = data.pop("base", None)
    return deep_merge(read_preset(parent, _warn=False), data) if parent else data


def parse_override(item: str) -> dict[str, Any]:
    """'train.epochs=5' -> {'train': {'epochs': 5}} with the value parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: cannot parse value: {e}") from e
    if raw == "":
        value = ""
    out: dict[str, Any] = {}
    cur = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return out


def merged_dict(preset: str | None = None, files: list[str] | None = None,
                overrides: list[str] | None = None) -> dict[str, Any]:
    """The merged raw config dict (before validation)."""
    data: dict[str, Any] = to_dict(RunConfig())
    if preset:
        data = deep_merge(data, read_preset(preset))
    for f in files or []:
        data = deep_merge(data, read_yaml(f))
    for o in overrides or []:
        data = deep_merge(data, parse_override(o))
    return data


# Keys that were removed, with the value they always had: a stored config (a checkpoint, a run's config.yaml)
# still holding one at that value loads; any other value is refused as an unknown key.
REMOVED_KEYS: dict[tuple[str, str], Any] = {("train", "select_on_test"): False}


def _drop_removed_keys(data: dict[str, Any]) -> dict[str, Any]:
    out = dict(data)
    for (section, key), old in REMOVED_KEYS.items():
        part = out.get(section)
        if isinstance(part, dict) and key in part and part[key] == old:
            out[section] = {k: v for k, v in part.items() if k != key}
    return out


def build_config(data: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a raw dict into a RunConfig, including the method's own Config."""
    from kdad.align import AlignSpec
    from kdad.methods import get_method
    from kdad.tiling import TileSpec

    cfg: RunConfig = from_dict(RunConfig, _drop_removed_keys(data), where)
    if cfg.train.threads < 0:
        raise ConfigError(f"{where}: train.threads={cfg.train.threads} must be >= 0 (0: torch's default, every core)")
    if not 0.0 <= cfg.train.lr_decay_from <= 1.0:
        raise ConfigError(f"{where}: train.lr_decay_from={cfg.train.lr_decay_from} must be in [0, 1] "
                          "(the fraction of the epochs trained at the full learning rate; 1 = no decay)")
    TileSpec.from_data(cfg.data)  # range checks of the data.tile* keys
    AlignSpec.from_data(cfg.data, allow_auto=True)  # data.align* keys, and what they exclude
    spec = get_method(cfg.method)
    method_cfg = from_dict(spec.Config, cfg.model, f"{where}: method {cfg.method!r}: model")
    cfg.model = to_dict(method_cfg)
    return cfg


def load_config(preset: str | None = None, files: list[str] | None = None,
                overrides: list[str] | None = None) -> RunConfig:
    """Defaults < preset < files < overrides, validated."""
    return build_config(merged_dict(preset, files, overrides))


def method_config(cfg: RunConfig) -> Any:
    """The method's Config dataclass instance for this run."""
    from kdad.methods import get_method

    spec = get_method(cfg.method)
    return from_dict(spec.Config, cfg.model, f"method {cfg.method!r}: model")


def dump_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML text."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
