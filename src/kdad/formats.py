"""The dataset formats: one registry read by the loaders (kdad.data.factory), `kdad data check`, the CLI,
the config (`data.format`) and the docs (docs/datasets.md, checked by a test).

Plain values only, nothing imported: the config module reads it before torch is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

# data.format; kept equal to FORMATS' keys by tests/test_config.py
DataFormat = Literal["mvtec", "loco", "folder", "visa", "btad", "mvtec_ad2", "realiad", "3cad"]


@dataclass(frozen=True)
class Format:
    """One dataset layout: what `data.root` points at, whether `kdad data check` reads it, its loader."""

    name: str
    root: str  # what data.root is (one line for docs and errors)
    loader: str  # the class or function that reads it
    checked: bool  # `kdad data check` detects and checks it


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("mvtec", "the category folder (train/, test/, ground_truth/)", "kdad.data.MVTecDataset", True),
    Format("loco", "the MVTec LOCO AD category folder", "kdad.data.loco.LocoDataset", True),
    Format("folder", "unused: data.good_dir, bad_dir, mask_dir, test_good_dir", "kdad.data.FolderDataset", False),
    Format("visa", "the VisA folder (+ data.category)", "kdad.data.visa.VisADataset", True),
    Format("btad", "the BTAD folder (+ data.category)", "kdad.data.btad.BTADDataset", True),
    Format("mvtec_ad2", "the MVTec AD 2 folder (+ data.category)", "kdad.data.mvtec_ad2.MVTecAD2Dataset", True),
    Format("realiad", "the Real-IAD folder (+ data.category)", "kdad.data.realiad.RealIADDataset", True),
    Format("3cad", "the 3CAD folder (+ data.category)", "kdad.data.threecad.ThreeCADDataset", False),
)}

CHECKED_FORMATS: tuple[str, ...] = tuple(name for name, f in FORMATS.items() if f.checked)
"""The formats `kdad data check` detects and checks (`--format` choices besides "auto")."""

assert tuple(FORMATS) == get_args(DataFormat), "DataFormat and FORMATS must list the same names"
