"""model.map_norm_shrink: auto (kdad.blocks.map_choice): the shrink is chosen on synthetic anomalies pasted onto
the held-out normals, and it picks the division where the normals err in a fixed pattern and a softer reading
where the division turns noise into anomalies."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kdad.blocks.map_choice import AUTO_SHRINKS, KINDS, choose_shrink, synthetic_variants
from kdad.blocks.maps import AnomalyOutput

SIZE = 64


class ResidualMap(nn.Module):
    """A stand-in student: its map is a fixed pattern of normal error plus each pixel's distance from mid grey."""

    def __init__(self, pattern: Tensor) -> None:
        super().__init__()
        self.pattern = pattern

    def forward(self, x: Tensor) -> AnomalyOutput:
        amap = self.pattern + (x - 0.5).abs().mean(1, keepdim=True)
        return AnomalyOutput(amap, amap.flatten(1).amax(1))


def normals(n: int = 16) -> Tensor:
    gen = torch.Generator().manual_seed(3)
    return (0.5 + 0.002 * torch.randn(n, 3, SIZE, SIZE, generator=gen)).clamp(0, 1)


def choose(pattern: Tensor) -> tuple[float, dict[float, float]]:
    model = ResidualMap(pattern)
    images = normals()
    with torch.no_grad():
        maps = model(images).anomaly_map[:, 0]
    choice = choose_shrink(model, images, maps, torch.device("cpu"))
    assert set(choice.image_auroc) == set(AUTO_SHRINKS) and choice.synthetic > len(images)
    return choice.shrink, choice.image_auroc


def test_auto_divides_where_the_normals_err_in_a_fixed_pattern() -> None:
    # normals err 20x more on the right than on the left: raw, a defect on the left never tops a good image
    ramp = torch.linspace(0.05, 1.0, SIZE).expand(SIZE, SIZE)[None, None]
    shrink, auroc = choose(ramp)
    assert shrink == 0.0
    assert auroc[0.0] > auroc[1.0] + 0.1


def test_auto_shrinks_where_the_division_turns_noise_into_anomalies() -> None:
    # a quarter of the frame where the normals barely err: divided, its noise outscores defects everywhere else
    pattern = torch.ones(1, 1, SIZE, SIZE)
    pattern[..., : SIZE // 4] = 1e-4
    shrink, auroc = choose(pattern)
    assert shrink > 0.0
    assert auroc[shrink] > auroc[0.0] + 0.1


def test_auto_falls_back_to_the_plain_division_on_too_few_normals() -> None:
    model = ResidualMap(torch.ones(1, 1, SIZE, SIZE))
    images = normals(3)
    with pytest.warns(UserWarning, match="at least 4 held-out normals"):
        choice = choose_shrink(model, images, model(images).anomaly_map[:, 0], torch.device("cpu"))
    assert choice.shrink == 0.0 and choice.normals == 3 and not choice.image_auroc


def test_synthetic_variants_name_their_kind_and_keep_to_the_foreground() -> None:
    images = normals(4)
    fg = torch.zeros(4, 1, SIZE, SIZE)
    fg[..., SIZE // 2:] = 1.0  # the right half only
    imgs, masks, src, names = synthetic_variants(images, torch.Generator().manual_seed(0), 2, foreground=fg)
    assert len(imgs) == len(masks) == len(src) == len(names) > 0 and set(names) <= set(KINDS)
    assert bool(masks.any(dim=(1, 2)).all()) and not masks[..., : SIZE // 2].any()
    changed = (imgs != images[src]).any(1)
    assert not changed[..., : SIZE // 2].any()  # nothing pasted outside the foreground
