"""Command-line interface: kdad fit | test | predict | calibrate | feedback | export | serve | demo | list
(`kdad CMD --help`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdad.errors import KdadError
from kdad.formats import CHECKED_FORMATS

if TYPE_CHECKING:
    from kdad.data.check import CheckReport

EPILOG = """Config precedence (lowest to highest): method defaults < --preset < -c FILE (repeatable) < --set KEY=VALUE
(repeatable, dotted keys such as train.epochs=5 or model.backbone=resnet18). `kdad list` shows methods and presets;
`kdad fit --preset rd_cpu --print-config` shows every key with its resolved value."""


def _add_config_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("configuration")
    g.add_argument("--preset", help="a shipped preset, e.g. rd_paper, rd_cpu, stfpm_paper (see `kdad list`)")
    g.add_argument("-c", "--config", action="append", default=[], metavar="FILE",
                   help="YAML config file(s) merged over the preset, in order")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one key, value parsed as YAML (e.g. --set train.epochs=5)")
    g.add_argument("--method", help="shortcut for --set method=NAME")
    g.add_argument("--data", metavar="DIR", help="shortcut for --set data.root=DIR (an MVTec-layout category folder)")
    g.add_argument("--device", help="shortcut for --set train.device=DEV (auto, cpu, cuda, cuda:1)")
    g.add_argument("--categories", metavar="A,B,C",
                   help="several categories (names under --data, or folder paths): one model over all of them "
                        "(multi-class), unless `fit --per-category` trains one model each")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")


def _finite_float(text: str) -> float:
    """argparse type for thresholds: a finite number (NaN or inf would call every image normal)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _add_pixel_cap_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-megapixels", type=_finite_float, default=None, metavar="MP",
                   help="largest image in megapixels (width x height / 1e6), checked from the header before "
                        "decoding (default $KDAD_MAX_MEGAPIXELS, else 50; the same cap as training)")


def _add_runner_options(p: argparse.ArgumentParser) -> None:
    """Backend, device and precision of the model that predict/serve run."""
    p.add_argument("--backend", choices=["torch", "onnx"], default=None,
                   help="torch (default for checkpoints) or onnx (the given .onnx, or RUN/model.onnx)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (torch backend)")
    p.add_argument("--precision", choices=["exact", "fp32", "bf16"], default="exact",
                   help="torch backend: exact eager fp32 (default), fast fp32 (same maps within 1e-5), or bf16 "
                        "(faster on AVX-512-BF16 CPUs and GPUs; maps change slightly, see docs/benchmarks.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch backend with --precision fp32/bf16: torch.compile the model (the first batches "
                        "compile, 10-60 s; then about 1.1-1.2x faster on CPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="torch backend with --precision fp32/bf16 on CUDA: replay one captured CUDA graph per "
                        "batch shape (removes kernel-launch overhead at small batches)")


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The torch-backend speed options of `kdad predict/serve` (--precision, --compile, --cuda-graph)."""
    return {"precision": getattr(args, "precision", "exact"), "compile": getattr(args, "compile", False),
            "cuda_graph": getattr(args, "cuda_graph", False)}


def _config_from_args(args: argparse.Namespace):  # noqa: ANN202
    from kdad.config import load_config

    if args.data and not Path(args.data).is_dir():  # the commonest mistake, answered before torch is imported
        raise KdadError(f"--data {args.data}: folder not found")
    overrides = list(args.overrides)
    if args.method:
        overrides.insert(0, f"method={args.method}")
    if args.data:
        overrides.append(f"data.root={args.data}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if getattr(args, "categories", None):
        names = [c.strip() for c in args.categories.split(",") if c.strip()]
        overrides.append("data.categories=" + json.dumps(names))
    return load_config(args.preset, args.config, overrides)


def _default_run_dir(method: str, root: str) -> Path:
    name = Path(root).name if root else "run"
    return Path("runs") / f"{method}_{name}_{time.strftime('%Y%m%d-%H%M%S')}"


def check_run(run: str) -> None:
    """Refuse a RUN argument that holds no model, before torch is imported: name the path and, for a
    folder that contains runs (the demo's kdad_demo/ holds kdad_demo/run), the run folders inside it."""
    path = Path(run)
    if not path.exists():
        raise KdadError(f"{path} not found: give a run folder (with model.ckpt), a .ckpt or an .onnx file")
    if not path.is_dir() or (path / "model.ckpt").is_file() or (path / "model.onnx").is_file():
        return
    inside = sorted(str(c.parent) for pattern in ("*/model.ckpt", "*/*/model.ckpt") for c in path.glob(pattern))
    hint = f"; did you mean {' or '.join(inside[:3])}?" if inside else " (is training finished?)"
    raise KdadError(f"{path} is not a run folder: it has no model.ckpt{hint}")


def cmd_fit(args: argparse.Namespace) -> int:
    from kdad.config import dump_yaml

    cfg = _config_from_args(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from kdad.train import fit  # after the config is known good: it imports torch
    run_dir = Path(args.out) if args.out else _default_run_dir(cfg.method, cfg.data.root or cfg.data.good_dir)
    jobs = [(cfg, run_dir)]
    if args.per_category and cfg.data.categories:
        import dataclasses

        from kdad.data.factory import category_configs

        jobs = [(dataclasses.replace(cfg, data=c), run_dir / c.category) for c in category_configs(cfg.data)]
    if args.test:  # a bad test file should stop the run now, not after hours of training
        from kdad.data.factory import check_splits

        for job_cfg, _ in jobs:
            check_splits(job_cfg.data, ["test"])
    from kdad.distributed import world

    for job_cfg, job_dir in jobs:
        fit(job_cfg, job_dir, resume=args.resume)
        if world()[0] != 0:  # under torchrun rank 0 reports and tests; the other ranks only train
            continue
        print(f"trained {job_cfg.method}: {job_dir / 'model.ckpt'}")
        if job_cfg.data.align == "auto" or job_cfg.data.align_fill or job_cfg.data.align_region == "part":
            from kdad.align import decode_mask  # say what fit picked from the training images
            from kdad.config import read_yaml

            picked = read_yaml(job_dir / "config.yaml")["data"]
            zoom = f", zoom {picked['align_zoom']}" if picked["align"] == "axis" else ""
            if picked["align"] == "axis" and picked.get("align_envelope"):
                share = float(decode_mask(picked["align_envelope"]).float().mean())
                zoom += f", scored on the part's envelope ({share:.0%} of the aligned frame)"
            print(f"data.align={job_cfg.data.align} chose {picked['align']}{zoom} (docs/align.md)")
        if args.test:
            from kdad.evaluate import evaluate_run

            res = evaluate_run(job_dir, device=job_cfg.train.device)
            print(json.dumps(res["metrics"], indent=2))
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    check_run(args.run)
    from kdad.checkpoint import load_bundle
    from kdad.config import build_config
    from kdad.evaluate import evaluate_run

    run = Path(args.run)
    data = None
    if args.data:
        cfg = build_config(load_bundle(run if run.suffix == ".ckpt" else run / "model.ckpt")["config"])
        cfg.data.root = args.data
        data = cfg.data
    run_dir = run.parent if run.suffix == ".ckpt" else run
    res = evaluate_run(run_dir, data=data, device=args.device or "auto", out_dir=args.out,
                       batch_size=args.batch_size, report=not args.no_report,
                       checkpoint=run if run.suffix == ".ckpt" else None, backend=args.backend)
    print(json.dumps(res["metrics"], indent=2))
    print(f"wrote {Path(args.out or run_dir) / 'metrics.json'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    check_run(args.run)
    from kdad.deploy.predict import run_predict

    run_predict(args.run, args.inputs, args.out, args.backend, args.device, args.threshold, args.batch_size,
                args.workers, overlays=args.overlays, masks=args.masks, progress=getattr(args, "progress", True),
                max_megapixels=getattr(args, "max_megapixels", None), **_runner_options(args))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    check_run(args.run)
    from kdad.export import export_onnx, metadata_path, read_metadata

    if args.format != "onnx":  # argparse choices already restrict this; kept for programmatic callers
        raise KdadError(f"unknown export format {args.format!r}; valid: onnx")
    path = export_onnx(args.run, args.out, opset=args.opset, exporter=args.exporter, check=not args.no_check)
    meta = read_metadata(path)
    parity = meta.get("parity_check") or {}
    print(f"exported {meta['method']} ({meta['exporter']} exporter, opset {meta['opset']}, "
          f"input (B, 3, {meta['image_size']}, {meta['image_size']}) RGB [0, 1]): {path}")
    if parity:
        print(f"parity vs PyTorch on random batches {parity['batches']}: max |map diff| "
              f"{parity['max_abs_map_diff']:.2e}, max |score diff| {parity['max_abs_score_diff']:.2e}")
    print(f"metadata (thresholds, input contract): {metadata_path(path)}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    check_run(args.run)
    if not Path(args.normals).is_dir():
        raise KdadError(f"--normals {args.normals}: folder not found")
    from kdad.calibrate import calibrate_run, describe

    summary = calibrate_run(args.run, args.normals, alpha=args.alpha, device=args.device,
                            batch_size=args.batch_size, out=args.out)
    print(describe(summary))
    return 0


def cmd_feedback(args: argparse.Namespace) -> int:
    check_run(args.run)
    if not Path(args.good).is_dir():
        raise KdadError(f"--good {args.good}: folder not found")
    from kdad.feedback import describe, feedback_run

    summary = feedback_run(args.run, args.good, out=args.out, epochs=args.epochs, device=args.device,
                           holdout=args.holdout, share=args.share)
    print(describe(summary))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    check_run(args.run)
    from kdad.deploy.runner import make_runner
    from kdad.serve import serve  # first: a missing [serve] extra is reported before the model loads

    runner = make_runner(args.run, args.backend, args.device, args.threshold, **_runner_options(args))
    serve(runner, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          max_megapixels=args.max_megapixels)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from kdad.demo import run_demo

    run_demo(Path(args.out), kind=args.kind, epochs=args.epochs, device=args.device or "auto")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from kdad.report import compare_runs

    out = Path(args.out)
    compare_runs([Path(r) for r in args.runs], out)
    print(f"wrote {out}")
    return 0


def cmd_synth_gallery(args: argparse.Namespace) -> int:
    import torch

    from kdad.data.factory import build_dataset
    from kdad.synthesis import SynthesisConfig, TextureBank
    from kdad.synthesis.gallery import save_gallery

    cfg = _config_from_args(args)
    ds = build_dataset(cfg.data, "train")
    n = min(args.n, len(ds))  # type: ignore[arg-type]
    images = torch.stack([ds[i]["image"] for i in range(n)])
    scfg = SynthesisConfig(kind=args.kind, texture_dir=cfg.data.texture_dir or "")
    bank = TextureBank(cfg.data.texture_dir, cfg.data.image_size) if args.kind == "perlin_texture" else None
    path = save_gallery(images, scfg, Path(args.out), n=n, seed=cfg.train.seed, textures=bank,
                        category=args.category)
    print(f"wrote {path}")
    return 0


def method_papers() -> dict[str, str]:
    """{method name: paper} read from the source of kdad.methods, without importing it.

    Importing the registry imports torch (10-20 s under load); `kdad list` only needs two strings per method.
    tests/test_cli.py checks that this matches kdad.methods.METHODS.
    """
    import ast
    from importlib import resources

    folder = resources.files("kdad") / "methods"
    registry = ast.parse((folder / "__init__.py").read_text())
    modules: dict[str, str] = {}
    for node in ast.walk(registry):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Attribute) \
                        and isinstance(value.value, ast.Name):
                    modules[str(key.value)] = value.value.id
    papers = {}
    for name, module in modules.items():
        tree = ast.parse((folder / f"{module}.py").read_text())
        papers[name] = next((ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                             and any(isinstance(t, ast.Name) and t.id == "PAPER" for t in n.targets)), "")
    return papers


def cmd_list(args: argparse.Namespace) -> int:
    from kdad.config import PRESET_ALIASES, list_presets, read_preset

    print("methods:")
    for name, paper in sorted(method_papers().items()):
        print(f"  {name:8s} {paper}")
    print("presets:")
    for p in list_presets():
        print(f"  {p:20s} method: {read_preset(p).get('method', 'rd')}")
    for old, new in sorted(PRESET_ALIASES.items()):
        print(f"  {old} (deprecated name of {new})")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from kdad.data.check import check_dataset

    report = check_dataset(args.path, args.format, category=args.category, split_file=args.split_file,
                           max_megapixels=args.max_megapixels)
    print(report.text())
    for line in _pose_hints(report, args.max_megapixels):
        print(line)
    return 1 if report.errors else 0  # warnings alone pass


def _pose_hints(report: CheckReport, max_megapixels: float | None) -> list[str]:
    """A HINT line per category whose good training images look like one elongated part at varying angles: the
    case data.align is for (docs/align.md). Hints only; they never change the exit code."""
    from kdad.align import evenly_spaced, pose_spread_of_files

    lines = []
    for cat in sorted({e.category for e in report.entries}):
        paths = [e.image for e in report.entries if e.category == cat and e.split == "train" and e.label == 0]
        spread = pose_spread_of_files([paths[i] for i in evenly_spaced(len(paths))], max_megapixels=max_megapixels)
        if spread.suggests_align():
            lines.append(f"HINT    pose: category {cat!r}: one elongated part on a plain backdrop at varying angles "
                         f"({spread.text()}); student-teacher models score such parts near chance unless the part "
                         "is aligned: the presets with data.align=auto do so; otherwise --set data.align=axis "
                         "--set data.align_fill=0.83 (docs/align.md)")
    return lines

def build_parser() -> argparse.ArgumentParser:
    """The argparse tree; every option has help text."""
    parser = argparse.ArgumentParser(prog="kdad", description="Knowledge-distillation anomaly detection.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="train a model on normal images", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_options(p)
    p.add_argument("--out", help="run folder (default runs/<method>_<data>_<time>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.ckpt if present")
    p.add_argument("--test", action="store_true", help="evaluate on the test split right after training")
    p.add_argument("--per-category", action="store_true",
                   help="with --categories: train one model per category into <out>/<category> (one-class mode)")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("test", help="evaluate a run: metrics.json, scores.csv, report.html")
    p.add_argument("run", help="run folder (with model.ckpt) or a .ckpt file")
    p.add_argument("--data", help="test another dataset root than the one trained on")
    p.add_argument("--out", help="output folder (default: the run folder)")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--no-report", action="store_true", help="skip the HTML report")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="torch (the checkpoint, default) or onnx (the exported RUN/model.onnx: same metrics)")
    p.set_defaults(func=cmd_test)

    p = sub.add_parser("predict", help="score images: CSV/JSON of scores and decisions, optional overlays")
    p.add_argument("run", help="run folder (with model.ckpt), a .ckpt file, or an exported .onnx")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="image files, folders (recursive) or glob patterns")
    p.add_argument("--out", default="predictions", help="output folder (default ./predictions)")
    p.add_argument("--overlays", action="store_true", help="write heatmap overlay PNGs")
    p.add_argument("--masks", action="store_true", help="write binary defect masks at the pixel threshold")
    p.add_argument("--threshold", type=_finite_float, help="image threshold overriding the stored one")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--workers", type=int, default=0, help="worker processes decoding images (default 0)")
    _add_pixel_cap_option(p)
    _add_runner_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="export a run to ONNX (+ a JSON metadata file beside it)")
    p.add_argument("run", help="run folder (with model.ckpt) or a .ckpt file")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="export format (default onnx)")
    p.add_argument("--out", help="output .onnx path (default RUN/model.onnx); metadata goes to the same name .json")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, supported by onnxruntime's CPU EP)")
    p.add_argument("--exporter", choices=["auto", "torchscript", "dynamo"], default="auto",
                   help="torch exporter: legacy TorchScript, dynamo (needs onnxscript), or auto (first that works)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime-vs-PyTorch parity check")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("calibrate", help="new thresholds from new good images (new camera, lighting, line), "
                       "no retraining; the old model.ckpt is kept (docs/operating_point.md)")
    p.add_argument("run", help="run folder (with model.ckpt) or a .ckpt file")
    p.add_argument("--normals", required=True, metavar="DIR",
                   help="folder of good images (the files directly inside it)")
    p.add_argument("--alpha", type=_finite_float, default=None,
                   help="false-alarm rate to guarantee, in (0, 1) (default: the run's train.alpha, 0.01)")
    p.add_argument("--out", help="write the new bundle here instead of replacing RUN/model.ckpt")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("feedback", help="fine-tune a run on good images marked as false alarms, recalibrate, "
                       "and compare before/after; writes a new run (docs/operating_point.md)")
    p.add_argument("run", help="run folder (with model.ckpt); it is left unchanged")
    p.add_argument("--good", required=True, metavar="DIR",
                   help="folder of good images the run flagged (false alarms), the files directly inside it")
    p.add_argument("--out", help="new run folder (default RUN-feedback-<time>); must not exist")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda (default: the run's train.device)")
    p.add_argument("--holdout", type=_finite_float, default=0.5,
                   help="share of the good images kept out of the fine-tune to measure the after-rate honestly "
                        "(default 0.5; 0 trains on all; fewer than 4 images: all are trained on)")
    p.add_argument("--share", type=_finite_float, default=0.2,
                   help="share of each fine-tuning epoch made of the good images, by repetition (default 0.2)")
    p.set_defaults(func=cmd_feedback)

    p = sub.add_parser("serve", help="HTTP API + web page for a run (FastAPI/uvicorn)")
    p.add_argument("run", help="run folder (with model.ckpt), a .ckpt file, or an exported .onnx")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    _add_runner_options(p)
    p.add_argument("--threshold", type=_finite_float, help="default image threshold overriding the stored one")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted image file in MB (default 20)")
    _add_pixel_cap_option(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="make a synthetic inspection dataset, train RD, evaluate, write a report")
    p.add_argument("--out", default="kdad_demo", help="folder for the data and the run (default ./kdad_demo)")
    p.add_argument("--kind", choices=["texture", "object"], default="object", help="kind of synthetic parts")
    p.add_argument("--epochs", type=int, default=None, help="override the demo preset's epochs")
    p.add_argument("--device", help="auto, cpu, cuda")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="compare several tested runs side by side in one HTML page")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders that contain metrics.json")
    p.add_argument("--out", default="comparison.html", help="output HTML file (default comparison.html)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("synth-gallery", help="save a PNG grid of synthetic anomalies with their masks")
    _add_config_options(p)
    p.add_argument("--kind", choices=["perlin_texture", "simplex", "cutpaste"], default="perlin_texture",
                   help="synthesis kind (default perlin_texture; it needs data.texture_dir)")
    p.add_argument("--category", help="category name selecting the foreground rule (e.g. bottle)")
    p.add_argument("-n", type=int, default=8, help="number of training images shown (default 8)")
    p.add_argument("--out", default="synthesis_gallery.png", help="output PNG (default synthesis_gallery.png)")
    p.set_defaults(func=cmd_synth_gallery)

    p = sub.add_parser("data", help="dataset tools (`kdad data check PATH`)")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION", help="check")
    q = data_sub.add_parser("check", help="detect the layout, count images per split and defect type, list problems "
                            "(exit 1 on errors)")
    q.add_argument("path", help="dataset folder or one category folder")
    q.add_argument("--format", default="auto", choices=["auto", *CHECKED_FORMATS],
                   help="layout (default auto: detected)")
    q.add_argument("--category", help="check only this category of a multi-category folder")
    q.add_argument("--split-file", help="VisA split CSV or Real-IAD JSON (or its folder) if not at the released place")
    _add_pixel_cap_option(q)
    q.set_defaults(func=cmd_data_check)

    p = sub.add_parser("list", help="list methods and presets")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; user errors print one clear line and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KdadError as e:
        print(f"kdad {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
