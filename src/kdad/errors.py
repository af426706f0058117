"""Exceptions raised for anything a user can cause; messages name the culprit."""


class KdadError(Exception):
    """Base class of every kdad error."""


class ConfigError(KdadError, ValueError):
    """A config key, value or option is wrong (the message names the key and the valid choices)."""


class DatasetError(KdadError, ValueError):
    """A dataset file or folder is missing, unreadable or malformed (the message names the path)."""


class WeightsError(KdadError, RuntimeError):
    """Pretrained weights cannot be found or do not match the architecture."""
