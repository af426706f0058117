"""Exceptions raised for anything a user can cause; messages name the culprit."""


class KdadError(Exception):
    """Base class of every kdad error."""


class ConfigError(KdadError, ValueError):
    """A config key, value or option is wrong (the message names the key and the valid choices)."""


class DatasetError(KdadError, ValueError):
    """A dataset file or folder is missing, unreadable or malformed (the message names the path)."""


class WeightsError(KdadError, RuntimeError):
    """Pretrained weights cannot be found or do not match the architecture."""


def require_extra(extra: str, modules: tuple[str, ...], needed_for: str) -> None:
    """Raise KdadError with the pip command when a module of an optional extra is missing.

    Checked up front: the libraries' own errors blame a layer (torch.onnx) or print a raw traceback (fastapi).
    """
    from importlib.util import find_spec

    missing = [m for m in modules if find_spec(m) is None]
    if missing:
        raise KdadError(f"{needed_for} needs {', '.join(missing)}, which is not installed; "
                        f'install it with: pip install "kdad[{extra}]"')
