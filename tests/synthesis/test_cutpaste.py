import math

import torch

from kdad.synthesis import cutpaste_normal, cutpaste_scar
from kdad.synthesis.cutpaste import color_jitter


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


# ----------------------------------------------------------------------------- references written out per pixel
YIQ = [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]]  # NTSC


def jitter_reference(patch: torch.Tensor, mask: torch.Tensor, s: float, seed: int) -> torch.Tensor:
    """The module docstring's jitter in float64: brightness, contrast (pivot: mean grey under the mask),
    saturation (pivot: the pixel's grey), hue (rotation of I, Q by U(-s, s) turns), clamping after each."""
    g = torch.Generator().manual_seed(seed)
    b = patch.shape[0]
    bright, contrast, sat = (1 - s + 2 * s * torch.rand(b, generator=g).double() for _ in range(3))
    turn = -s + 2 * s * torch.rand(b, generator=g).double()
    yiq = torch.tensor(YIQ, dtype=torch.float64)
    out = torch.empty_like(patch, dtype=torch.float64)
    for i in range(b):
        x = (patch[i].double() * bright[i]).clamp(0, 1)
        grey = torch.einsum("c,chw->hw", yiq[0], x)
        m = mask[i, 0].double()
        pivot = (grey * m).sum() / max(float(m.sum()), 1.0)
        x = ((x - pivot) * contrast[i] + pivot).clamp(0, 1)
        grey = torch.einsum("c,chw->hw", yiq[0], x)
        x = ((x - grey) * sat[i] + grey).clamp(0, 1)
        y, ich, qch = torch.einsum("dc,chw->dhw", yiq, x)
        a = 2 * math.pi * float(turn[i])
        rotated = torch.stack((y, ich * math.cos(a) - qch * math.sin(a), ich * math.sin(a) + qch * math.cos(a)))
        out[i] = torch.einsum("dc,chw->dhw", torch.linalg.inv(yiq), rotated).clamp(0, 1)
    return out


def test_color_jitter_matches_a_per_image_reference() -> None:
    g = torch.Generator().manual_seed(7)
    patch = torch.rand(6, 3, 5, 7, generator=g) * torch.tensor([1.0, 0.6, 0.3]).view(1, 3, 1, 1)
    mask = (torch.rand(6, 1, 5, 7, generator=g) > 0.4).float()
    mask[0] = 0  # an empty mask: the pivot is 0, not a division by zero
    for s in (0.1, 0.45):
        got = color_jitter(patch, mask, s, torch.Generator().manual_seed(3))
        want = jitter_reference(patch, mask, s, 3)
        assert torch.allclose(got.double(), want, atol=1e-5)
        assert (got - patch).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image changed
    bright = color_jitter(torch.full((1, 3, 2, 2), 0.95), torch.ones(1, 1, 2, 2), 0.45, torch.Generator())
    assert bright.max() <= 1.0 and bright.min() >= 0.0
    # strong jitter on bright, saturated patches: every intermediate clamp matters; one-pixel masks
    strong = 0.5 + 0.5 * torch.rand(8, 3, 4, 4, generator=g)
    strong[:, 2] *= 0.2
    one = torch.zeros(8, 1, 4, 4)
    one[:, :, 1, 2] = 1.0
    for seed in range(4):
        got = color_jitter(strong, one, 0.9, torch.Generator().manual_seed(seed))
        assert torch.allclose(got.double(), jitter_reference(strong, one, 0.9, seed), atol=1e-5)


def normal_reference(images: torch.Tensor, seed: int, area: tuple[float, float], aspect: float) -> tuple:
    """CutPaste-normal per image with Python loops: the same draws, the box copied pixel by pixel."""
    g = torch.Generator().manual_seed(seed)
    b, _, height, width = images.shape
    a = area[0] + (area[1] - area[0]) * torch.rand(b, generator=g)
    lo, hi = math.log(aspect), math.log(1 / aspect)
    log_r = lo + (hi - lo) * torch.rand(b, generator=g)
    corners = torch.rand(b, 4, generator=g)
    out, masks = images.clone(), torch.zeros(b, 1, height, width)
    for i in range(b):
        pixels, ratio = float(a[i]) * height * width, math.exp(float(log_r[i]))
        w = min(max(round(math.sqrt(pixels * ratio)), 1), width)
        h = min(max(round(math.sqrt(pixels / ratio)), 1), height)
        fy, fx, ty, tx = (int(float(c) * (n - k + 1)) for c, n, k in
                          zip(corners[i], (height, width, height, width), (h, w, h, w)))
        out[i, :, ty:ty + h, tx:tx + w] = images[i, :, fy:fy + h, fx:fx + w]
        masks[i, :, ty:ty + h, tx:tx + w] = 1
    return out, masks


def test_cutpaste_normal_matches_a_per_image_reference() -> None:
    images = torch.rand(12, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    for area, aspect in (((0.02, 0.15), 0.3), ((0.1, 0.5), 0.5)):
        got, mask = cutpaste_normal(images, torch.Generator().manual_seed(4), area, aspect, jitter=0.0)
        want, want_mask = normal_reference(images, 4, area, aspect)
        assert torch.equal(mask, want_mask) and torch.equal(got, want)
    got, mask = cutpaste_normal(images, torch.Generator().manual_seed(4))  # defaults, jitter 0.1
    _, want_mask = normal_reference(images, 4, (0.02, 0.15), 0.3)
    assert torch.equal(mask, want_mask) and not torch.equal(got, normal_reference(images, 4, (0.02, 0.15), 0.3)[0])
    assert torch.equal(got, cutpaste_normal(images, torch.Generator().manual_seed(4), jitter=0.1)[0])
    thin = torch.rand(12, 3, 40, 6, generator=torch.Generator().manual_seed(3))  # boxes clamped to [1, side]
    for area, aspect in (((0.0002, 0.002), 0.3), ((0.5, 0.9), 0.1)):
        for seed in range(3):
            got, mask = cutpaste_normal(thin, torch.Generator().manual_seed(seed), area, aspect, jitter=0.0)
            want, want_mask = normal_reference(thin, seed, area, aspect)
            assert torch.equal(mask, want_mask) and torch.equal(got, want)


def scar_reference(images: torch.Tensor, seed: int, widths: tuple[int, int], lengths: tuple[int, int],
                   rotation: float) -> tuple:
    """CutPaste-scar per pixel: a (length x width) rectangle cut axis-aligned, rotated about its centre and
    placed so that its rotated bounding box lies inside the image; nearest source pixel."""
    g = torch.Generator().manual_seed(seed)
    b, _, height, width = images.shape
    sw = torch.randint(widths[0], widths[1] + 1, (b,), generator=g).clamp(max=width)
    sh = torch.randint(lengths[0], lengths[1] + 1, (b,), generator=g).clamp(max=height)
    deg = -rotation + 2 * rotation * torch.rand(b, generator=g)
    u = torch.rand(b, 4, generator=g)
    out, masks = images.clone(), torch.zeros(b, 1, height, width)
    for i in range(b):
        w, h, t = int(sw[i]), int(sh[i]), math.radians(float(deg[i]))
        c, s = math.cos(t), math.sin(t)
        fy, fx = int(float(u[i, 0]) * (height - h + 1)), int(float(u[i, 1]) * (width - w + 1))
        half_y, half_x = (w * abs(s) + h * abs(c)) / 2, (w * abs(c) + h * abs(s)) / 2
        cy = half_y - 0.5 + float(u[i, 2]) * max(height - 2 * half_y, 0)
        cx = half_x - 0.5 + float(u[i, 3]) * max(width - 2 * half_x, 0)
        for r in range(height):
            for col in range(width):
                qy = c * (r - cy) + s * (col - cx)
                qx = -s * (r - cy) + c * (col - cx)
                if abs(qy) < h / 2 and abs(qx) < w / 2:
                    masks[i, 0, r, col] = 1
                    sr = min(max(math.floor(fy + (h - 1) / 2 + qy + 0.5), 0), height - 1)
                    sc = min(max(math.floor(fx + (w - 1) / 2 + qx + 0.5), 0), width - 1)
                    out[i, :, r, col] = images[i, :, sr, sc]
    return out, masks


def test_cutpaste_scar_matches_a_per_pixel_reference() -> None:
    images = torch.rand(6, 3, 30, 36, generator=torch.Generator().manual_seed(8))
    for widths, lengths, rotation in (((2, 16), (10, 25), 45.0), ((3, 6), (12, 40), 80.0)):
        got, mask = cutpaste_scar(images, torch.Generator().manual_seed(1), widths, lengths, rotation, jitter=0.0)
        want, want_mask = scar_reference(images, 1, widths, lengths, rotation)
        assert (mask != want_mask).sum() <= 2  # float32 vs float64 on the rectangle's edge
        same = (mask == want_mask).expand_as(got)
        assert torch.equal(got[same], want[same])
        assert mask.flatten(1).sum(1).min() > 0
    got, mask = cutpaste_scar(images, torch.Generator().manual_seed(1))  # defaults, jitter 0.1
    want, want_mask = scar_reference(images, 1, (2, 16), (10, 25), 45.0)
    assert (mask != want_mask).sum() <= 2 and not torch.equal(got, want)
    assert torch.equal(got, cutpaste_scar(images, torch.Generator().manual_seed(1), jitter=0.1)[0])
    narrow = images[:, :, :, :14]  # a scar wider than the image once rotated: its centre stays at the middle
    got, mask = cutpaste_scar(narrow, torch.Generator().manual_seed(2), (8, 12), (20, 30), 80.0, jitter=0.0)
    want, want_mask = scar_reference(narrow, 2, (8, 12), (20, 30), 80.0)
    assert (mask != want_mask).sum() <= 2
