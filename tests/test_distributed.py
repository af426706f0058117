"""Data parallel training and sharded prediction through torchrun (gloo on CPU here; nccl on GPUs).

Each torchrun test starts two processes, so the configs are tiny (64 px, resnet18 with random weights, 1-2 steps).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdad.checkpoint import load_bundle
from kdad.data.demo import make_demo_dataset
from kdad.distributed import ShardedWeightedSampler

TINY = ["--set", "model.backbone=resnet18", "--set", "model.weights=random", "--set", "data.image_size=64",
        "--set", "train.device=cpu", "--set", "train.progress=false"]
# 2 ranks x batch 4 against 1 process x batch 8, one Adam step: the same images and, with SyncBatchNorm, the same
# statistics, so the gradients differ only by float summation order. Adam's first step moves each weight by +-lr
# whatever the gradient's size, so a gradient within float noise of zero may flip its weight's step: 0.2 % of the
# weights here, as many as between channels_last on and off in one process. Without SyncBatchNorm 27 % differ.
MAX_DIFFERING_WEIGHTS = 0.01  # share of weights more than WEIGHT_ATOL apart
WEIGHT_ATOL = 1e-4
LR = 0.005  # rd_cpu's; a flipped first Adam step is 2 x lr


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _kdad(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={_port()}"]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "kdad.cli", *args], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "d", n_train=8, n_test_good=3, n_test_bad=4, size=64,
                             kind="object")


def _one_step_fit(demo: Path) -> list[str]:
    """RD, 8 training images, no hold-out, one epoch, fp32 (the equality below is fp32's; rd_cpu trains in bf16)."""
    return ["fit", "--preset", "rd_cpu", "--data", str(demo), *TINY, "--set", "train.val_fraction=0.0",
            "--set", "train.epochs=1", "--set", "train.cpu_bf16=false"]


@pytest.fixture(scope="module")
def single_run(demo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 8: one step (the reference of the DDP test, and the model the predict test serves)."""
    run = tmp_path_factory.mktemp("single") / "one"
    _kdad([*_one_step_fit(demo), "--out", str(run), "--set", "train.batch_size=8"])
    return run


def test_torchrun_two_processes_train_one_model(demo: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    _kdad(["fit", "--preset", "rd_cpu", "--data", str(demo), "--out", str(run), *TINY,
           "--set", "train.epochs=2", "--set", "train.batch_size=2"], nproc=2)
    info = json.loads((run / "train_info.json").read_text())
    assert info["world_size"] == 2
    # 7 training images (1 held out) split over 2 ranks with batch 2: 2 steps per epoch on each rank
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1]
    assert log[-1]["iters"] == 4


def test_two_ranks_train_the_weights_of_one_process_with_the_doubled_batch(demo: Path, single_run: Path,
                                                                           tmp_path: Path) -> None:
    """8 training images, no hold-out, one step. DDP averages the ranks' gradients of their batch-mean losses,
    i.e. the gradient of the mean over all 8; SyncBatchNorm normalises with the statistics of all 8."""
    _kdad([*_one_step_fit(demo), "--out", str(tmp_path / "ddp"), "--set", "train.batch_size=4",
           "--set", "train.sync_batchnorm=true"], nproc=2)
    ddp, one = load_bundle(tmp_path / "ddp" / "model.ckpt"), load_bundle(single_run / "model.ckpt")
    assert ddp["train_info"]["iters"] == one["train_info"]["iters"] == 1
    assert ddp["model"].keys() == one["model"].keys()
    n_weights = n_differ = 0
    for k, ref in one["model"].items():
        if ref.is_floating_point():
            diff = (ddp["model"][k] - ref).abs()
            assert float(diff.max()) <= 2 * LR + 1e-6, k
            n_weights, n_differ = n_weights + diff.numel(), n_differ + int((diff > WEIGHT_ATOL).sum())
    assert n_differ / n_weights < MAX_DIFFERING_WEIGHTS


def test_sharded_predict_equals_single_process_row_for_row(demo: Path, single_run: Path, tmp_path: Path) -> None:
    inputs = [str(demo / "test")]
    _kdad(["predict", str(single_run), *inputs, "--out", str(tmp_path / "one"), "--device", "cpu"])
    _kdad(["predict", str(single_run), *inputs, "--out", str(tmp_path / "two"), "--device", "cpu"], nproc=2)
    rows = [list(csv.reader((tmp_path / name / "predictions.csv").open())) for name in ("one", "two")]
    assert len(rows[0]) == 1 + 7
    assert rows[0] == rows[1]
    one, two = (json.loads((tmp_path / name / "predictions.json").read_text()) for name in ("one", "two"))
    assert [r.keys() for r in one] == [r.keys() for r in two]
    for a, b in zip(one, two, strict=True):
        # same paths, decisions, labels and reasons; floats to 1e-5: a rank's batches hold other images, and the
        # gate's teacher pass may round differently with another batch (seen: gate_score 21.2626991 vs 21.2627010)
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key


def test_sharded_weighted_sampler_deals_one_draw_out() -> None:
    weights = [1.0, 1.0, 2.0, 4.0, 0.0]
    shards = [list(ShardedWeightedSampler(weights, rank, 2, seed=3)) for rank in range(2)]
    assert [len(s) for s in shards] == [3, 3]
    gen = torch.Generator().manual_seed(3)
    draws = torch.multinomial(torch.tensor(weights, dtype=torch.double), 6, replacement=True, generator=gen).tolist()
    assert shards[0] == draws[0::2] and shards[1] == draws[1::2]
    assert 4 not in shards[0] + shards[1]  # zero weight is never drawn
    sampler = ShardedWeightedSampler(weights, 0, 2, seed=3)
    sampler.set_epoch(1)  # reseeds with seed + epoch, the same on every rank
    assert list(sampler) == list(ShardedWeightedSampler(weights, 0, 2, seed=4))


def test_cpu_sync_batchnorm_keeps_the_variance_of_a_bf16_batch(tmp_path: Path) -> None:
    """Under bf16 autocast the synced statistics are summed in fp32, as torch's BatchNorm does: in bf16,
    E[x^2] - mean^2 cancels and the running statistics drifted by 0.23 from one process's after one step."""
    import torch
    import torch.distributed as dist

    from kdad.distributed import CpuSyncBatchNorm

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 8, 8) * 0.5 + 20.0  # a large mean: bf16's E[x^2] - mean^2 cancels
        ref, synced = torch.nn.BatchNorm2d(3), CpuSyncBatchNorm(3)
        ref(x)
        y = synced(x.to(torch.bfloat16))
        assert y.dtype == torch.bfloat16
        assert torch.allclose(synced.running_mean, ref.running_mean, atol=0.02)
        assert torch.allclose(synced.running_var, ref.running_var, rtol=0.05)
    finally:
        dist.destroy_process_group()
