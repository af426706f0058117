"""Registry of methods: an explicit dict from name to MethodSpec (no import-time registration)."""

from __future__ import annotations

from kdad.errors import ConfigError
from kdad.methods import bkd, cfrg, dskd, patchst, rd, rdpp, snl, stfpm, urd
from kdad.methods.base import MethodSpec

METHODS: dict[str, MethodSpec] = {
    "bkd": bkd.SPEC,
    "rd": rd.SPEC,
    "stfpm": stfpm.SPEC,
    "rdpp": rdpp.SPEC,
    "urd": urd.SPEC,
    "dskd": dskd.SPEC,
    "snl": snl.SPEC,
    "cfrg": cfrg.SPEC,
    "patchst": patchst.SPEC,
}


def get_method(name: str) -> MethodSpec:
    """The spec of a method by name; the error lists the valid names."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid methods: {sorted(METHODS)}")
    return METHODS[name]
