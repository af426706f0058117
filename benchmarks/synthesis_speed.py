"""How fast is kdad.synthesis on CPU? Images/s per synthesis kind at 256 px, batch 16, 2 threads.

Question: is synthesis fast enough not to starve training? RD-family training on CPU runs at roughly
3-10 img/s, so synthesis should be well above that (and it runs in DataLoader workers or before the step).

Timed with 2 torch threads (the issue's setting) and 1 thread (a DataLoader worker's setting). The load
average is recorded: other jobs on a shared 2-core machine inflate 2-thread times (OpenMP oversubscription).

Run:  python benchmarks/synthesis_speed.py [--repeats 7] [--out benchmarks/results/synthesis_speed.json]
Reads ../shared/data (MVTec bottle train images if present, DTD textures); falls back to random images.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _common import write_json
from PIL import Image

import kdad
from kdad.synthesis import SynthesisConfig, TextureBank, synthesize

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SIZE, BATCH = 256, 16
THREAD_SETTINGS = (2, 1)  # 2: the main process on this machine; 1: what a DataLoader worker gets
TRAIN_SPEED_IMG_S = (3.0, 10.0)


def load_images() -> tuple[torch.Tensor, str]:
    """(16, 3, 256, 256) in [0, 1]: MVTec bottle train images (PIL bilinear), else uniform noise."""
    paths = sorted((SHARED / "mvtec_ad" / "bottle" / "train" / "good").glob("*.png"))[:BATCH]
    if len(paths) < BATCH:
        return torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)), "random"
    arrays = [
        np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
        for p in paths
    ]
    return torch.from_numpy(np.stack(arrays)).permute(
        0, 3, 1, 2
    ).float() / 255.0, "mvtec_ad/bottle/train/good"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def time_config(
    images: torch.Tensor, cfg: SynthesisConfig, bank: TextureBank, category: str | None, repeats: int
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    synthesize(images, cfg, gen, bank, category)  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        synthesize(images, cfg, gen, bank, category)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "median_batch_s": round(median, 4),
        "min_batch_s": round(min(seconds), 4),
        "images_per_s_median": round(BATCH / median, 1),
        "images_per_s_best": round(BATCH / min(seconds), 1),
    }


def verdict(slowest: float) -> str:
    """Run serially before each step, synthesis adds train_speed / synth_speed to the step time."""
    lo, hi = (t / slowest for t in TRAIN_SPEED_IMG_S)
    text = (
        f"slowest kind: {slowest:.0f} img/s (median). Run serially in the training step it adds "
        f"{100 * lo:.0f}-{100 * hi:.0f}% to the step time of "
        f"{TRAIN_SPEED_IMG_S[0]:.0f}-{TRAIN_SPEED_IMG_S[1]:.0f} img/s CPU training"
    )
    if hi <= 0.5:
        return text + ": fast enough, synthesis does not starve training."
    return text + ": noticeable; run it in DataLoader workers to overlap it with the step."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synthesis_speed.json")
    args = parser.parse_args()

    load_before = [round(x, 2) for x in os.getloadavg()]
    images, image_source = load_images()
    dtd = SHARED / "dtd" / "images"
    start = time.perf_counter()
    bank = TextureBank(dtd, SIZE)
    bank_load_s = time.perf_counter() - start

    cases: dict[str, tuple[SynthesisConfig, str | None]] = {
        "perlin_texture (URD default, no foreground)": (SynthesisConfig(kind="perlin_texture"), None),
        "perlin_texture + otsu foreground (capsule/screw)": (
            SynthesisConfig(kind="perlin_texture", foreground="otsu"),
            None,
        ),
        "perlin_texture + DRAEM texture augmentation": (
            SynthesisConfig(kind="perlin_texture", texture_augment=True),
            None,
        ),
        "simplex (RD++, fixed field)": (SynthesisConfig(kind="simplex"), None),
        "simplex (fresh field)": (SynthesisConfig(kind="simplex", simplex_field="fresh"), None),
        "cutpaste normal": (SynthesisConfig(kind="cutpaste"), None),
        "cutpaste scar": (SynthesisConfig(kind="cutpaste", cutpaste_variant="scar"), None),
        "cutpaste both (50/50)": (SynthesisConfig(kind="cutpaste", cutpaste_variant="both"), None),
    }
    results: dict[str, dict[str, dict[str, float]]] = {}
    for threads in THREAD_SETTINGS:
        torch.set_num_threads(threads)
        key = f"{threads}_threads"
        results[key] = {}
        for name, (cfg, category) in cases.items():
            res = time_config(images, cfg, bank, category, args.repeats)
            res["added_step_time_at_10_img_s"] = round(TRAIN_SPEED_IMG_S[1] / res["images_per_s_median"], 3)
            results[key][name] = res
            print(
                f"{key} {name:50s} {res['images_per_s_median']:8.1f} img/s median, "
                f"{res['images_per_s_best']:8.1f} best"
            )
    load_after = [round(x, 2) for x in os.getloadavg()]
    # Per kind, the better of the thread settings (a trainer can pick either), then the slowest kind.
    slowest = min(max(results[k][name]["images_per_s_median"] for k in results) for name in cases)
    report = {
        "question": "images/s of each synthesis kind at 256 px, batch 16, CPU, 2 threads: "
        "fast enough for training?",
        "date_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads_timed": list(THREAD_SETTINGS),
            "load_average_1_5_15_before": load_before,
            "load_average_1_5_15_after": load_after,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "kdad": kdad.__version__,
        },
        "setup": {
            "image_size": SIZE,
            "batch": BATCH,
            "repeats": args.repeats,
            "images": image_source,
            "textures": str(dtd.relative_to(SHARED.parent.parent))
            if dtd.is_relative_to(SHARED.parent.parent)
            else str(dtd),
            "texture_count": len(bank),
            "texture_bank_load_s": round(bank_load_s, 3),
            "note": "grabcut foreground not timed (OpenCV not installed); "
            "URD runs it once per training image, not per step",
        },
        "results": results,
        "slowest_images_per_s": slowest,
        "training_speed_cpu_img_s": list(TRAIN_SPEED_IMG_S),
        "verdict_basis": "per kind the faster thread setting's median, then the slowest kind",
        "verdict": verdict(slowest),
    }
    write_json(args.out, report)
    print(report["verdict"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
