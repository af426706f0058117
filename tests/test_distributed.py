"""Multi-process data parallel training through torchrun (gloo on CPU here; nccl on GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kdad.data.demo import make_demo_dataset


def test_torchrun_two_processes_train_one_model(tmp_path: Path) -> None:
    root = make_demo_dataset(tmp_path / "d", n_train=8, n_test_good=2, n_test_bad=2, size=64, kind="object")
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           "-m", "kdad.cli", "fit", "--preset", "rd_cpu", "--data", str(root), "--out", str(run),
           "--set", "model.backbone=resnet18", "--set", "model.weights=random", "--set", "data.image_size=64",
           "--set", "train.epochs=2", "--set", "train.batch_size=2", "--set", "train.device=cpu",
           "--set", "train.progress=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((run / "train_info.json").read_text())
    assert info["world_size"] == 2
    # 7 training images (1 held out) split over 2 ranks with batch 2: 2 steps per epoch on each rank
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[-1]["iters"] == 4
