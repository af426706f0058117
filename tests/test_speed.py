"""kdad.speed: the optimized inference path gives the eager maps (fp32) or close to them (bf16)."""

import contextlib
import copy
import math
from typing import Any

import pytest
import torch

from kdad.blocks.maps import AnomalyMapHead, FastAnomalyMapHead, blur_matrix, resize_matrix
from kdad.config import from_dict
from kdad.errors import ConfigError
from kdad.methods import METHODS, get_method
from kdad.speed import (
    GraphedTrainStep,
    fold_batchnorm,
    optimize_for_inference,
    prepare_training,
    use_fused_optimizers,
)

TINY = {"backbone": "resnet18", "weights": "random"}
FP32_ATOL = 1e-5
# bf16 autocast: ~8 mantissa bits through the network; the map stays fp32 after the features. Measured
# max |bf16 - fp32| / map range: 0.1-0.4 % on RD/STFPM at 256 px (docs/benchmarks.md); bound at 3 %.
BF16_REL_TOL = 0.03


def _fresh(name: str, **levers: bool) -> tuple[Any, Any, torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(spec, cfg, tiny model in train mode, its optimizers, prepare_training's info) from seed 0."""
    spec = get_method(name)
    cfg = from_dict(spec.Config, TINY)
    torch.manual_seed(0)
    model = spec.Model(cfg).train()
    opts = spec.optimizers(model, cfg)
    info = prepare_training(model, opts, **{"channels_last": False, "fused": False, **levers})
    return spec, cfg, model, opts, info


def _step(spec: Any, cfg: Any, model: torch.nn.Module, opts: dict[str, Any], x: torch.Tensor) -> dict[str, float]:
    logs = spec.train_step(model, {"image": x}, opts, cfg, torch.Generator().manual_seed(0))
    return {k: float(v) for k, v in logs.items()}


def _trained(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A tiny model after one train step (so BatchNorm running stats are not the identity)."""
    spec = get_method(name)
    cfg = from_dict(spec.Config, TINY)
    torch.manual_seed(0)
    model = spec.Model(cfg)
    opts = spec.optimizers(model, cfg)
    model.train()
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    spec.train_step(model, {"image": x, "mask": torch.zeros(2, 1, 64, 64)}, opts, cfg, torch.Generator().manual_seed(0))
    return model.eval(), x


@pytest.mark.parametrize("name", sorted(METHODS))
def test_fp32_fast_path_matches_eager(name: str) -> None:
    model, x = _trained(name)
    with torch.inference_mode():
        ref = model(x)
    fast = optimize_for_inference(model, "cpu", "fp32", image_size=64)
    out = fast(x)
    assert out.anomaly_map.shape == ref.anomaly_map.shape and out.anomaly_map.dtype == torch.float32
    torch.testing.assert_close(out.anomaly_map, ref.anomaly_map, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(out.score, ref.score, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["rd", "stfpm"])
def test_bf16_fast_path_within_tolerance(name: str) -> None:
    model, x = _trained(name)
    with torch.inference_mode():
        ref = model(x).anomaly_map
    out = optimize_for_inference(model, "cpu", "bf16", image_size=64)(x).anomaly_map
    assert out.dtype == torch.float32
    assert float((out - ref).abs().max()) <= BF16_REL_TOL * float(ref.max() - ref.min())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_in_bf16(name: str) -> None:
    """`--precision bf16` and `train.cpu_bf16` work for every method (ops without a bf16 kernel run in fp32)."""
    model, x = _trained(name)
    out = optimize_for_inference(model, "cpu", "bf16", image_size=64)(x)
    assert out.anomaly_map.dtype == torch.float32 and bool(torch.isfinite(out.anomaly_map).all())
    spec, cfg, model, opts, _ = _fresh(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logs = _step(spec, cfg, model, opts, x)
    assert all(math.isfinite(v) for v in logs.values())


def test_optimize_leaves_the_model_untouched() -> None:
    model, _ = _trained("rd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, "cpu", "fp32", image_size=64)
    assert fast.info["folded_bn"] > 0 and fast.info["fast_heads"] == 1
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(model.head) is AnomalyMapHead


def test_fold_batchnorm_counts_resnet_pairs() -> None:
    model, _ = _trained("stfpm")
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model, torch.rand(1, 3, 64, 64)) == n_bn  # every BN of both ResNets follows a conv
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_keeps_a_pair_whose_fold_is_wrong(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fold is checked on its own layer: a wrong one is undone and its BN stays, the others are kept."""
    from kdad.deploy import fast as speed  # the fast path lives there (kdad.speed re-exports it)

    model, x = _trained("stfpm")
    with torch.inference_mode():
        ref = model(x).anomaly_map
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    bad = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))  # the stem conv, BN after it
    real = speed._fold_into

    def corrupt(conv: torch.nn.Module, bn: torch.nn.BatchNorm2d) -> None:
        real(conv, bn)
        if conv is bad:
            conv.weight = torch.nn.Parameter(conv.weight + 1.0, requires_grad=False)

    monkeypatch.setattr(speed, "_fold_into", corrupt)
    assert fold_batchnorm(model, x) == n_bn - 1
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 1
    with torch.inference_mode():
        torch.testing.assert_close(model(x).anomaly_map, ref, atol=FP32_ATOL, rtol=0)


def test_optimize_starts_again_unfolded_when_the_map_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    from kdad.deploy import fast as speed

    model, x = _trained("rd")
    with torch.inference_mode():
        ref = model(x).anomaly_map

    def moved(net: torch.nn.Module, example: torch.Tensor, atol: float = 1e-4) -> int:
        for m in net.modules():  # damage the copy the way a bad fold would, then report it
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(1.0)
        raise speed.FoldError("map moved")

    monkeypatch.setattr(speed, "fold_batchnorm", moved)
    fast = optimize_for_inference(model, "cpu", "fp32", image_size=64)
    assert fast.info["folded_bn"] == 0 and fast.info["fold_error"] == "map moved"
    torch.testing.assert_close(fast(x).anomaly_map, ref, atol=FP32_ATOL, rtol=0)
    with pytest.raises(speed.FoldError, match="inplace=True"):
        optimize_for_inference(model, "cpu", "fp32", image_size=64, inplace=True)


@pytest.mark.parametrize(
    "distance,fuse,sigma,align,level",
    [("cosine", "sum", 4.0, True, None), ("cosine", "mul", 4.0, True, None), ("l2norm", "mul", 0.0, False, 0),
     ("cosine", "sum", 2.0, False, 1), ("cosine", "sum", 0.0, True, None)],
)
def test_fast_head_matches_head(distance: str, fuse: str, sigma: float, align: bool, level: int | None) -> None:
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(2, c, s, s, generator=g) for c, s in ((8, 16), (16, 8), (32, 4))]
    student = [t + 0.5 * torch.randn(t.shape, generator=g) for t in teacher]
    head = AnomalyMapHead(distance, fuse, sigma, align, level)  # type: ignore[arg-type]
    ref = head(teacher, student, (64, 48))
    out = FastAnomalyMapHead.from_head(head)(teacher, student, (64, 48))
    torch.testing.assert_close(out.anomaly_map, ref.anomaly_map, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.score, ref.score, atol=1e-6, rtol=1e-5)


def test_resize_and_blur_matrices() -> None:
    v = torch.rand(3, 1, 10, dtype=torch.float64)
    up = torch.nn.functional.interpolate(v, size=25, mode="linear", align_corners=True)
    torch.testing.assert_close(v @ resize_matrix(10, 25, True).T, up)
    g = blur_matrix(40, 4.0)
    torch.testing.assert_close(g.sum(1), torch.ones(40, dtype=torch.float64))  # normalised, reflect padding


def test_bad_precision_names_choices() -> None:
    model, _ = _trained("rd")
    with pytest.raises(ConfigError, match="fp32"):
        optimize_for_inference(model, "cpu", "int8")
    with pytest.raises(ConfigError, match="CUDA"):
        optimize_for_inference(model, "cpu", "fp16")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_fused_optimizer_gives_the_same_update(kind: str) -> None:
    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        # no conv bias before BN: its gradient is ~0 and Adam's ~sign(grad) step would amplify rounding noise
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8),
                                  torch.nn.Conv2d(8, 4, 1))
        opt = (torch.optim.Adam(net.parameters(), lr=0.005, betas=(0.5, 0.999)) if kind == "adam" else
               torch.optim.SGD(net.parameters(), lr=0.4, momentum=0.9, weight_decay=1e-3))
        if fused:
            assert use_fused_optimizers({"o": opt}) == 1 and opt.param_groups[0]["fused"]
        x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        for _ in range(3):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_fused_switch_skips_optimizers_with_state() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    assert use_fused_optimizers({"o": opt}) == 0 and not opt.param_groups[0]["fused"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_channels_last_training_step_matches(name: str) -> None:
    """train.channels_last changes memory layout only: the same loss and the same updated weights."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = []
    for cl in (False, True):
        spec, cfg, model, opts, _ = _fresh(name, channels_last=cl, fused=cl)
        logs = _step(spec, cfg, model, opts, x.contiguous(memory_format=torch.channels_last) if cl else x)
        # gradients, not updated weights: Adam's first step is ~lr * sign(grad), which flips on rounding noise
        results.append((logs, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    (logs0, g0), (logs1, g1) = results
    for k in logs0:
        assert logs1[k] == pytest.approx(logs0[k], rel=1e-3, abs=1e-4), k
    assert g0.keys() == g1.keys() and g0
    # fp32 summation order differs between NCHW and NHWC kernels and train-mode BN at batch 2 amplifies it:
    # measured relative errors are 1e-5..1e-2; a layout bug gives O(1). Gradients that are ~0 by construction
    # (a conv bias feeding BatchNorm) are only rounding noise and are skipped.
    top = max(float(v.norm()) for v in g0.values())
    for k, v in g0.items():
        if float(v.norm()) > 1e-4 * top:
            rel = float((g1[k] - v).norm() / v.norm())
            assert rel < 3e-2, f"{k}: relative gradient error {rel:.2e}"


def test_cuda_graph_needs_cuda() -> None:
    model, _ = _trained("rd")
    with pytest.raises(ConfigError, match="cuda_graph"):
        optimize_for_inference(model, "cpu", "fp32", cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_replay_matches_eager(precision: str) -> None:
    model, x = _trained("rd")
    plain = optimize_for_inference(model, "cuda", precision, image_size=64)
    graphed = optimize_for_inference(model, "cuda", precision, image_size=64, cuda_graph=True)
    for batch in (x, x.flip(0), x[:1]):  # a new input of a captured shape, then a new shape
        ref, out = plain(batch), graphed(batch)
        torch.testing.assert_close(out.anomaly_map, ref.anomaly_map, atol=1e-5, rtol=1e-5)
    assert graphed.cuda_graph and len(graphed._graphs) == 2


def test_graphed_train_step_needs_cuda_and_a_warmup() -> None:
    opts = _fresh("rd")[3]
    with pytest.raises(ConfigError, match="cuda_graph"):
        GraphedTrainStep(lambda b: {}, opts, torch.device("cpu"))
    if torch.cuda.is_available():
        with pytest.raises(ConfigError, match="warmup"):
            GraphedTrainStep(lambda b: {}, opts, torch.device("cuda"), warmup=0)


def test_graph_safe_steps_log_device_tensors() -> None:
    """Graph-safe methods return their losses as tensors (nothing read on the host inside the step)."""
    for name in sorted(METHODS):
        spec = get_method(name)
        if spec.graph_safe:
            spec, cfg, model, opts, _ = _fresh(name)
            logs = spec.train_step(model, {"image": torch.rand(2, 3, 64, 64)}, opts, cfg, torch.Generator())
            assert logs and all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in logs.values()), name
    assert {n for n in METHODS if get_method(n).graph_safe} == {"rd", "stfpm"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["rd", "stfpm"])
def test_cuda_graph_training_takes_the_eager_steps(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Graph replay trains like eager steps: the same losses and weights after warm-up, capture and replays.

    Batches are scaled apart so that a replay on a stale input would show in the losses. Deterministic cuDNN:
    weights whose gradient is rounding noise (a conv bias before BatchNorm) would otherwise take Adam steps of
    either sign in the two runs.
    """
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    xs = [(0.2 + 0.15 * i) * torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    runs = []
    for graphed in (False, True):
        spec = get_method(name)
        cfg = from_dict(spec.Config, TINY)
        torch.manual_seed(0)
        model = spec.Model(cfg).cuda().train()
        opts = spec.optimizers(model, cfg)
        prepare_training(model, opts, channels_last=True, fused=True)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def eager(b: dict[str, Any], spec: Any = spec, model: Any = model, opts: Any = opts, cfg: Any = cfg) -> Any:
            return spec.train_step(model, b, opts, cfg, torch.Generator().manual_seed(0))

        step: Any = GraphedTrainStep(eager, opts, torch.device("cuda"), warmup=2) if graphed else eager
        losses = [float(step({"image": x.cuda().contiguous(memory_format=torch.channels_last)})["loss"]) for x in xs]
        runs.append((losses, {k: v.detach().clone() for k, v in model.state_dict().items()}))
        if graphed:
            assert step.captures == 1 and step.eager_calls == 2
    (l0, w0), (l1, w1) = runs
    assert l1 == pytest.approx(l0, rel=1e-3, abs=1e-5)
    moved = 0
    for k, v in w0.items():
        if v.is_floating_point():
            # a stale input or a doubled step moves nearly every element; rounding moves a few by < 1e-3
            assert float(((w1[k] - v).abs() > 1e-3).float().mean()) < 0.01, k
            moved += int(not torch.equal(v, start[k]))
    assert moved > 0  # the replays did train


def test_graphed_train_step_takes_the_eager_steps_on_a_stand_in_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """GraphedTrainStep's bookkeeping on CPU, with a stand-in for the CUDA graph API: like a real capture, the
    capture block leaves the model and optimizer as they were, and a replay reruns the step on the captured
    input buffers, writing the captured log tensors. Warm-up, capture and replays must then take exactly the
    eager steps, a batch of another shape runs eagerly, and the returned logs are copies."""
    spec, cfg, model, opts, _ = _fresh("stfpm")  # SGD: runs on CPU whatever its flags (Adam's capturable does not)
    holder: dict[str, Any] = {}

    class Stream:
        def __init__(self, *args: Any) -> None:
            pass

        def wait_stream(self, other: Any) -> None:
            pass

    class Graph:
        def replay(self) -> None:
            step = holder["step"]
            for k, v in step.step(dict(step._static)).items():
                step._logs[k].copy_(v)

    @contextlib.contextmanager
    def capture(graph: Any, **kw: Any) -> Any:
        saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opts["student"].state_dict())
        yield
        model.load_state_dict(saved[0])
        opts["student"].load_state_dict(saved[1])

    for name, value in {"Stream": Stream, "current_stream": lambda *a: Stream(), "CUDAGraph": Graph,
                        "stream": lambda s: contextlib.nullcontext(), "graph": capture}.items():
        monkeypatch.setattr(torch.cuda, name, value)

    def eager(b: dict[str, Any]) -> Any:
        return spec.train_step(model, b, opts, cfg, torch.Generator())

    xs = [(0.2 + 0.15 * i) * torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    xs.append(torch.rand(3, 3, 64, 64))  # another shape: eager
    step = holder["step"] = GraphedTrainStep(eager, opts, torch.device("cuda"), warmup=2)
    got = [step({"image": x}) for x in xs]
    assert (step.captures, step.eager_calls) == (1, 3)
    assert got[3]["loss"] is not got[4]["loss"] and float(got[3]["loss"]) != float(got[4]["loss"])
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    spec, cfg, model, opts, _ = _fresh("stfpm")
    ref = [eager({"image": x}) for x in xs]
    assert [float(g["loss"]) for g in got] == pytest.approx([float(r["loss"]) for r in ref], rel=1e-6)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-6, atol=1e-7, msg=k)


def test_graphed_train_step_makes_adam_capturable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Adam-like optimizers are switched to capturable=True (a captured step() refuses to run otherwise)."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a: None)  # the constructor only makes a stream
    opts = _fresh("rd")[3]
    GraphedTrainStep(lambda b: {}, opts, torch.device("cuda"))
    assert all(g["capturable"] for o in opts.values() for g in o.param_groups)


def test_compile_with_frozen_weights_keeps_each_models_weights() -> None:
    """compile + freeze folds weights into the compiled graph: two models of one class must still each give
    their own eager maps (dynamo recompiles per model instead of reusing the first one's constants)."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    spec = get_method("rd")
    cfg = from_dict(spec.Config, TINY)
    maps = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = spec.Model(cfg).eval()
        with torch.inference_mode():
            ref = model(x).anomaly_map
        fast = optimize_for_inference(model, "cpu", "fp32", image_size=64, compile=True)
        assert fast.info["freeze"] is True
        torch.testing.assert_close(fast(x).anomaly_map, ref, atol=FP32_ATOL, rtol=0)
        maps.append(ref)
    assert float((maps[0] - maps[1]).abs().max()) > 1e-3  # the two models do differ


def test_heap_allocator_switches_and_restores() -> None:
    """On glibc the lever takes effect inside the block, and big allocations work inside and after it."""
    from kdad.hardware import _glibc, heap_allocator

    with heap_allocator(False) as on:
        assert on is False
    with heap_allocator() as on:
        assert on is (_glibc() is not None)
        assert float(torch.ones(16, 1 << 20).sum()) == 16 * (1 << 20)  # 64 MiB: above any mmap threshold
    assert float(torch.ones(16, 1 << 20).sum()) == 16 * (1 << 20)


def test_train_compile_keeps_keys_and_losses() -> None:
    """train.compile compiles each top-level submodule in place: same state-dict keys, same losses (~35 s)."""
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    keys = list(_fresh("rd")[2].state_dict())
    losses = []
    for compile_ in (False, True):
        spec, cfg, model, opts, info = _fresh("rd", compile=compile_)
        assert list(model.state_dict()) == keys and info["compiled_modules"] == (4 if compile_ else 0)
        losses.append([_step(spec, cfg, model, opts, x)["loss"] for _ in range(2)])
    # inductor reorders float sums, and Adam's first step turns such last-bit gradient differences into
    # lr-sized moves: on an AVX2-only CPU the second loss moved by 4e-4 relative (1e-4 held on AVX-512)
    assert losses[1] == pytest.approx(losses[0], rel=2e-3)


def test_bf16_path_stores_conv_weights_once_and_leaves_the_model() -> None:
    model, x = _trained("rd")
    fast = optimize_for_inference(model, "cpu", "bf16", image_size=64)
    convs = [m for m in fast.module.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d)]
    assert fast.info["low_precision_weights"] == len(convs) > 0
    assert all(m.weight.dtype == torch.bfloat16 for m in convs)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the caller's model is a separate copy
    assert fast(x).anomaly_map.dtype == torch.float32
