"""Evaluation metrics as pure functions on numpy arrays (torch tensors are accepted and converted).

Definitions follow REFERENCE §5: AUROC/AP/F1-max equal scikit-learn's; AU-PRO is the exact MVTec AD
algorithm; AU-sPRO is the exact global-sort form of MVTec LOCO's; ``legacy_rd4ad_pro`` reproduces
RD4AD's per-image PRO and is not AU-PRO. Undefined values (e.g. a single class) are ``nan`` and
always come with a :class:`MetricWarning` naming the metric and the reason.
"""

from kdad.metrics._core import MetricWarning
from kdad.metrics.classification import (
    f1_max,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
)
from kdad.metrics.pro import au_pro, legacy_rd4ad_pro, pro_curve
from kdad.metrics.spro import (
    LOCO_LIMITS,
    LocoDefect,
    SproChannel,
    au_spro,
    load_loco_defects_config,
    loco_spro_subsets,
    spro_channel,
    spro_curve,
)
from kdad.metrics.summary import evaluate_maps

__all__ = [
    "LOCO_LIMITS",
    "LocoDefect",
    "MetricWarning",
    "SproChannel",
    "au_pro",
    "au_spro",
    "evaluate_maps",
    "f1_max",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "legacy_rd4ad_pro",
    "load_loco_defects_config",
    "loco_spro_subsets",
    "pixel_ap",
    "pixel_auroc",
    "pixel_f1_max",
    "pro_curve",
    "spro_channel",
    "spro_curve",
]
