import torch

from kdad.synthesis import cutpaste_normal, cutpaste_scar


def test_cutpaste_normal_mask_is_the_pasted_patch() -> None:
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out, mask = cutpaste_normal(images, torch.Generator().manual_seed(0), jitter=0.0)
    for b in range(8):
        m = mask[b, 0]
        rows, cols = m.nonzero(as_tuple=True)
        top, left = int(rows.min()), int(cols.min())
        h, w = int(rows.max()) - top + 1, int(cols.max()) - left + 1
        assert m.sum() == h * w  # one solid rectangle
        assert 0.02 * 32 * 32 * 0.7 <= h * w <= 0.15 * 32 * 32 * 1.3
        assert torch.equal(out[b][:, m == 0], images[b][:, m == 0])
        patch = out[b, :, top : top + h, left : left + w]
        found = any(
            torch.equal(images[b, :, y : y + h, x : x + w], patch)
            for y in range(32 - h + 1)
            for x in range(32 - w + 1)
        )
        assert found, "pasted pixels are not a copy of a source patch"


def test_cutpaste_jitter_and_scar() -> None:
    images = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out, mask = cutpaste_normal(images, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    out, mask = cutpaste_scar(images, torch.Generator().manual_seed(0))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    area = mask.flatten(1).sum(1)
    assert (area >= 2 * 10 * 0.5).all() and (area <= 16 * 25 * 1.2).all()
    assert torch.equal(out * (1 - mask), images * (1 - mask))
