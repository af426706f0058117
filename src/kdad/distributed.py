"""Data parallelism under torchrun on torch.nn.parallel.DistributedDataParallel, without the engine branching on
the method.

Methods own their backward and optimizer steps (several call backward more than once per batch: URD's teacher
then student, RD++ every batch with a step every `accumulate` batches). So the engine wraps the model in DDP for
its reducer (parameters broadcast from rank 0 at construction; gradients bucketed and all-reduced while backward
still runs, averaged over ranks) and hands the method a ``backward`` through the batch
(:func:`kdad.methods.base.backward`) that arms the reducer for each backward, as Lightning's manual optimization
does (``prepare_for_backward``). Parameters a backward does not reach are found from its loss
(``find_unused_parameters``), so a two-pass method needs no special case.

``train.sync_batchnorm`` makes BatchNorm layers in train mode normalise with the statistics of the whole global
batch: ``torch.nn.SyncBatchNorm`` on CUDA, :class:`CpuSyncBatchNorm` on CPU (gloo), where torch has no kernel.
With it, N ranks with batch B train like one process with batch N x B.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Sampler


def world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) when not launched by it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init(device: torch.device) -> bool:
    """Initialise the process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU); return whether it is active."""
    _, _, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose train-mode statistics are those of the global batch over all ranks (CPU / gloo).

    Per channel, the ranks all-reduce (sum x, sum x^2, count) through the differentiable
    ``torch.distributed.nn.functional.all_reduce``, so gradients flow to every rank's inputs as with one process.
    Eval mode, and a process that is not distributed, is plain BatchNorm2d. Input (B, C, H, W).
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        out_dtype = x.dtype
        x = x.float()  # under bf16 autocast, sums and E[x^2] - mean^2 in bf16 lose the variance (as torch's BN, fp32)
        n_local = x.numel() // x.shape[1]
        stats = torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)),
                           x.new_full((1,), float(n_local))])
        stats = all_reduce(stats)
        c = x.shape[1]
        count = stats[-1]
        mean = stats[:c] / count
        var = (stats[c:2 * c] / count - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                n = float(count)
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
                    tracked = int(self.num_batches_tracked)
                else:
                    tracked = 1
                momentum = self.momentum if self.momentum is not None else 1.0 / tracked  # cumulative average
                self.running_mean.mul_(1 - momentum).add_(mean.detach(), alpha=momentum)
                self.running_var.mul_(1 - momentum).add_(var.detach() * n / max(n - 1, 1), alpha=momentum)
        y = (x - mean.view(1, c, 1, 1)) * torch.rsqrt(var.view(1, c, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(out_dtype)


def _to_cpu_sync(module: nn.Module) -> nn.Module:
    """Swap every trainable BatchNorm2d under `module` for a CpuSyncBatchNorm holding the same tensors."""
    for name, child in module.named_children():
        trainable = any(p.requires_grad for p in child.parameters())
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, CpuSyncBatchNorm) and trainable:
            new = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats)
            new.load_state_dict(child.state_dict())
            if child.affine:
                new.weight, new.bias = child.weight, child.bias  # keep the optimizer's parameter objects
            new.train(child.training)
            setattr(module, name, new)
        else:
            _to_cpu_sync(child)
    return module


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Convert `model`'s BatchNorm layers to synchronised ones in place (before optimizers are built).

    Frozen parts (a teacher in eval mode) keep their layers: they never compute batch statistics."""
    if device.type == "cuda":
        for name, child in model.named_children():
            if any(p.requires_grad for p in child.parameters()):
                setattr(model, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
        return model
    return _to_cpu_sync(model)


def wrap(model: nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over `model`'s trainable parameters: rank 0's weights and buffers are broadcast now; each armed
    backward (:func:`prepare_backward`) all-reduces gradient buckets while it runs and leaves the average."""
    # A backward may leave parameters out (URD's teacher pass leaves the student), which DDP cannot know in
    # advance: find_unused_parameters stays on. Its one-time C++ warning when a backward reached every parameter
    # (RD and most others) is expected. Buffers: broadcast at construction; DDP's forward never runs, so they
    # are not re-broadcast (with train.sync_batchnorm the ranks' running statistics agree anyway).
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def prepare_backward(ddp: DistributedDataParallel, loss: Tensor) -> None:
    """Arm DDP's reducer for one backward from `loss` (what DDP's forward does after it returns): parameters
    that `loss` does not depend on are marked ready, so their buckets do not wait for them."""
    if torch.is_grad_enabled() and ddp.require_backward_grad_sync:
        ddp.require_forward_param_sync = True
        ddp.reducer._rebuild_buckets()  # once, from the first iteration's gradient order
        ddp.reducer.prepare_for_backward([loss])


def ddp_backward(ddp: DistributedDataParallel) -> Any:
    """The ``batch["backward"]`` the engine gives a method: arm the reducer, then ``loss.backward()``."""

    def backward(loss: Tensor) -> None:
        prepare_backward(ddp, loss)
        loss.backward()

    return backward


class ShardedWeightedSampler(Sampler[int]):
    """WeightedRandomSampler (with replacement) drawn identically on every rank, then dealt out: rank r takes
    draws r, r + N, r + 2N, ... So multi-class balancing holds over the global batch and no two ranks
    repeat each other's draws. ``set_epoch`` reseeds (``seed + epoch``), as DistributedSampler."""

    def __init__(self, weights: Sequence[float] | Tensor, rank: int, world_size: int, seed: int = 0) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world_size, self.seed, self.epoch = rank, world_size, seed, 0
        self.num_samples = math.ceil(len(self.weights) / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples * self.world_size, replacement=True, generator=gen)
        return iter(draws[self.rank::self.world_size].tolist())

    def __len__(self) -> int:
        return self.num_samples


def gather_objects(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None on the other ranks); [obj] when not distributed."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
