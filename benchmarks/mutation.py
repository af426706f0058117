"""Mutation testing of kdad's core with mutmut 3 (issue 23.2): killed / survived / timeout per module.

Each group below names source files, the fast unit tests run against them, and optionally which functions to
mutate (mutmut mutant-name globs, e.g. only the loss functions of a method file). For each group the script
copies src/, tests/ and pyproject.toml into a scratch folder, adds a [tool.mutmut] section for that group, runs
``mutmut run --max-children 1`` there (one worker: mutmut forks it per mutant and runs only the tests that
reach the mutated function), and reads back every mutant's status and diff. Survivors are matched against
benchmarks/mutation_equivalent.yaml (hand-written: a stable key -> a one-line reason the mutant is equivalent
or harmless) and written to benchmarks/results/mutation.json with their location and diff.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/mutation.py              # every group
    ... python benchmarks/mutation.py --group thresholds --group metrics            # some groups
    ... python benchmarks/mutation.py --list                                        # groups and tests

Not part of the test command (it takes long on one core); needs ``pip install -e ".[dev]"`` (mutmut).
Groups not given on the command line keep their previous entry in the JSON. Unexplained survivors are also
printed in the YAML form, ready to be killed by a test or pasted into mutation_equivalent.yaml with a reason.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mutation.json"
EQUIVALENT = ROOT / "benchmarks" / "mutation_equivalent.yaml"


@dataclass(frozen=True)
class Group:
    """Source files mutated together, the tests run against them, and (optionally) which functions.

    ``functions``: mutmut mutant-name globs (``kdad.methods.rd.x_rd_loss__mutmut_*``); empty = every function
    of ``files``. Method (class) functions are named ``kdad.module.xǁClassǁmethod__mutmut_N``.
    """

    files: tuple[str, ...]
    tests: tuple[str, ...]
    functions: tuple[str, ...] = ()
    note: str = ""


def _fn(module: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{module}.x_{n}__mutmut_*" for n in names)


def _tests(path: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{path}::{n}" for n in names)


# The decision rule (score >= threshold, the defect mask, the display range) lives in kdad/deploy/postprocess.py;
# its callers keep a few decision functions (batch streaming, evaluate's helpers, the service's result).
GROUPS: dict[str, Group] = {
    "metrics": Group(
        files=("src/kdad/metrics/__init__.py", "src/kdad/metrics/_core.py", "src/kdad/metrics/classification.py",
               "src/kdad/metrics/summary.py", "src/kdad/metrics/pro.py", "src/kdad/metrics/spro.py"),
        tests=("tests/test_metrics.py", "tests/test_thresholds.py", "tests/data/test_loco.py"),
    ),
    "maps_losses": Group(
        files=("src/kdad/blocks/maps.py", "src/kdad/blocks/losses.py"),
        tests=("tests/blocks/test_maps.py", "tests/blocks/test_losses.py", "tests/blocks/test_ocbe_decoders.py",
               "tests/test_speed.py::test_fast_head_matches_head", "tests/test_speed.py::test_resize_and_blur_matrices"),
        note="unit tests only: both heads against a float64 scipy reference in test_maps.py (test_rd and test_tiling "
             "build models, slow per mutant)",
    ),
    "thresholds": Group(
        files=("src/kdad/thresholds.py",),
        tests=("tests/test_thresholds.py",),
    ),
    "decision": Group(
        files=("src/kdad/deploy/postprocess.py", "src/kdad/deploy/batch.py", "src/kdad/evaluate.py",
               "src/kdad/deploy/serve/app.py"),
        tests=("tests/deploy/test_postprocess.py", "tests/deploy/test_decision_units.py", "tests/deploy/test_serve.py",
               "tests/deploy/test_decision.py",
               "tests/test_report.py")
        + _tests("tests/test_gate.py", "test_verdict_checks_the_gate_first_then_the_decision_rule",
                 "test_chroma_range_from_training_normals"),
        functions=("kdad.deploy.postprocess.*",)
        + _fn("kdad.deploy.batch", "stream_predictions")
        + _fn("kdad.evaluate", "display_range", "write_scores_csv", "compute_metrics", "good_images_flagged",
              "_mean_metrics", "thresholds_from_normals")
        + _fn("kdad.deploy.serve.app", "result_dict", "model_info"),
        note="postprocess.py whole; elsewhere the decision and post-processing functions only (file I/O, upload "
             "limits and routes are not mutated)",
    ),
    "checkpoint_resume": Group(
        files=("src/kdad/checkpoint.py", "src/kdad/train.py"),
        tests=("tests/test_train.py", "tests/test_checkpoint.py"),
        functions=("kdad.checkpoint.*",)
        + _fn("kdad.train", "_state", "check_resume_config", "_flat", "trim_log", "_load_resume"),
        note="checkpoint.py whole; in train.py the resume functions (fit() itself is not mutated: one mutant "
             "= one training run)",
    ),
    "synthesis": Group(
        files=("src/kdad/synthesis/__init__.py", "src/kdad/synthesis/cutpaste.py",
               "src/kdad/synthesis/foreground.py", "src/kdad/synthesis/gallery.py",
               "src/kdad/synthesis/perlin.py", "src/kdad/synthesis/simplex.py",
               "src/kdad/synthesis/textures.py"),
        tests=("tests/synthesis",),
    ),
    "method_losses": Group(
        files=("src/kdad/methods/rd.py", "src/kdad/methods/rdpp.py", "src/kdad/methods/urd.py",
               "src/kdad/methods/snl.py", "src/kdad/methods/dskd.py", "src/kdad/methods/bkd.py",
               "src/kdad/methods/cfrg.py", "src/kdad/methods/patchst.py"),
        tests=("tests/blocks/test_losses.py",)
        + _tests("tests/methods/test_rd.py", "test_default_loss_is_the_official_flattened_cosine")
        + _tests("tests/methods/test_rdpp.py", "test_recon_is_per_pixel_cosine",
                 "test_contrast_is_hinge_on_cosine_minus_margin",
                 "test_sinkhorn_divergence_zero_for_identical_and_positive_otherwise",
                 "test_ssot_loss_nonnegative_with_gradient_and_official_is_zero",
                 "test_sinkhorn_divergence_matches_a_float64_reference",
                 "test_ssot_loss_compares_each_image_with_a_rolled_partner",
                 "test_contrast_loss_batch_differs_from_channels", "test_ssot_shift_comes_from_the_given_generator_only",
                 "test_ssot_pools_height_and_width_to_the_grid_whatever_the_channels")
        + _tests("tests/methods/test_urd.py", "test_teacher_loss_one_pixel_mask_0_and_1",
                 "test_teacher_loss_sums_layers_and_averages_pixels", "test_layer_masks_resample_from_full_mask",
                 "test_student_loss_eqs_4_to_6", "test_student_loss_is_flattened_not_per_position",
                 "test_layer_masks_align_corners_and_strict_threshold")
        + _tests("tests/methods/test_snl.py", "test_cosine_distance_identical_orthogonal_opposite_and_zero",
                 "test_spatial_and_channel_losses_on_hand_values",
                 "test_spatial_ignores_per_position_scale_channel_ignores_per_channel_scale",
                 "test_intra_affinity_hand_value_and_shape_bound",
                 "test_intra_affinity_invariant_to_channel_rotation_and_position_scale",
                 "test_inter_affinity_hand_value_and_invariances",
                 "test_cram_compactness_hand_values_and_identity_start",
                 "test_intra_affinity_pools_a_non_square_map_when_one_side_exceeds_the_size",
                 "test_snl_losses_weights_each_term_on_the_code_after_cram",
                 "test_snl_losses_leaves_out_a_switched_off_term",
                 "test_cram_compactness_is_the_mean_over_images_and_positions")
        + _tests("tests/methods/test_dskd.py", "test_identical_student_and_teacher_give_zero_loss",
                 "test_position_swapped_student_is_penalised", "test_hand_checked_two_positions",
                 "test_hand_checked_asymmetric_case_fixes_the_kl_direction",
                 "test_chunked_equals_unchunked_values_and_grads", "test_matches_direct_kl_of_eqs_3_to_6",
                 "test_affinity_map_is_float32_under_autocast_and_keeps_the_map_shape",
                 "test_student_loss_follows_each_students_loss_kind")
        + _tests("tests/methods/test_bkd.py", "test_feature_loss_hand_values",
                 "test_bkd_loss_sums_layers_and_averages_shots",
                 "test_bkd_loss_forward_is_the_mean_over_shots_on_full_shapes")
        + _tests("tests/methods/test_cfrg.py", "test_discrepancy_loss_one_pixel",
                 "test_discrepancy_loss_upsamples_and_averages_layers", "test_segmentation_loss_is_bce_with_logits",
                 "test_recovery_loss_sums_layers_of_global_cosine", "test_recovery_loss_is_flattened_not_per_position",
                 "test_losses_resize_non_square_inputs_bilinearly_without_align_corners")
        + _tests("tests/methods/test_patchst.py", "test_hard_mse_keeps_only_the_largest_errors",
                 "test_hard_mse_is_the_error_of_the_difference_and_keeps_at_least_one"),
        functions=_fn("kdad.methods.rd", "rd_loss")
        + _fn("kdad.methods.rdpp", "contrast_loss", "_ot_eps", "sinkhorn_divergence", "ssot_loss")
        + _fn("kdad.methods.urd", "layer_masks", "teacher_loss", "student_loss")
        + _fn("kdad.methods.snl", "cosine_distance_along", "spatial_loss", "channel_loss", "intra_affinity",
              "inter_affinity", "intra_loss", "inter_loss", "snl_losses")
        + ("kdad.methods.snl.xǁCRAMǁcompactness__mutmut_*",)
        + _fn("kdad.methods.dskd", "_student_lse", "contextual_affinity_map", "contextual_affinity_loss",
              "student_loss")
        + _fn("kdad.methods.bkd", "feature_loss", "bkd_loss")
        + _fn("kdad.methods.cfrg", "discrepancy_loss", "segmentation_loss", "recovery_loss")
        + _fn("kdad.methods.patchst", "hard_mse"),
        note="the loss functions only, against the loss unit tests only (hand values and references; the tests "
             "that build or train a model cost seconds per mutant); snl.snl_losses and dskd.student_loss, which "
             "take the model, are tested on stand-in models without a backbone; STFPM's loss is "
             "normalized_l2_loss in blocks/losses.py (group maps_losses)",
    ),
}

STATUSES = ("killed", "survived", "timeout", "suspicious", "no tests", "segfault", "caught by type check",
            "skipped", "check was interrupted by user", "not checked")
NAME = re.compile(r"^(?P<module>.+?)\.x(?:_(?P<fn>[^ǁ]+?)|ǁ(?P<cls>[^ǁ]+)ǁ(?P<meth>.+?))__mutmut_(?P<n>\d+)$")


def function_of(mutant: str) -> tuple[str, str]:
    """(module, qualified function) of a mutmut mutant name."""
    m = NAME.match(mutant)
    if not m:
        return mutant, "?"
    fn = m["fn"] or f"{m['cls']}.{m['meth']}"
    return m["module"], fn


def changed_lines(diff: str) -> tuple[list[str], list[str], int | None]:
    """Removed and added lines (stripped) of a unified diff, and the old line number of the first change."""
    old: list[str] = []
    new: list[str] = []
    first = line = None
    for row in diff.splitlines():
        if row.startswith("@@"):
            line = int(re.search(r"-(\d+)", row)[1])
        elif line is None or row.startswith(("---", "+++")):
            continue
        elif row.startswith("-"):
            old.append(row[1:].strip())
            first, line = first or line, line + 1
        elif row.startswith("+"):
            new.append(row[1:].strip())
            first = first or line
        else:
            line += 1
    return old, new, first


def changed_only(diff: str) -> str:
    """The hunk headers and changed lines of a unified diff (its context lines make the report large)."""
    return "\n".join(r for r in diff.splitlines() if r.startswith(("@@", "-", "+")) and not
                     r.startswith(("---", "+++")))


def function_start(path: Path, qualname: str) -> int | None:
    """First line (decorators included) of function ``qualname`` (``f`` or ``Class.f``) in ``path``."""
    body = ast.parse(path.read_text()).body
    *owners, name = qualname.split(".")
    for owner in owners:
        body = next((n.body for n in body if isinstance(n, ast.ClassDef) and n.name == owner), [])
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name:
            return min([node.lineno] + [d.lineno for d in node.decorator_list])
    return None


def stable_key(module: str, fn: str, old: list[str], new: list[str]) -> str:
    """Key of a mutant that survives line-number shifts: function plus the changed code."""
    return f"{module}.{fn}: {' | '.join(old)} => {' | '.join(new)}"


def mutmut_exe() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    if not exe.exists():
        sys.exit("mutmut is not installed next to this python; pip install -e '.[dev]'")
    return str(exe)


def toml_list(items: tuple[str, ...] | list[str]) -> str:
    return "[" + ", ".join(json.dumps(x) for x in items) + "]"


def prepare(group: Group, work: Path) -> None:
    """Copy src/, tests/ and pyproject.toml (plus this group's [tool.mutmut]) into a clean ``work``."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", work / "src", ignore=ignore)
    shutil.copytree(ROOT / "tests", work / "tests", ignore=ignore)
    text = (ROOT / "pyproject.toml").read_text()
    if "[tool.mutmut]" in text:
        sys.exit("pyproject.toml already has [tool.mutmut]; this script writes its own per group")
    text += (
        "\n[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(group.files)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(group.tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q"]\n'
        'process_isolation = "fork"\n'
        "use_setproctitle = false\n"
        "use_git_change_detection = false\n"
    )
    (work / "pyproject.toml").write_text(text)


def run_group(group: Group, work: Path, limit_s: float) -> dict:
    """Run mutmut for one group in a fresh ``work``; return the run's facts (collect() reads the statuses)."""
    prepare(group, work)
    cmd = [mutmut_exe(), "run", "--max-children", "1", *group.functions]
    t0 = time.time()
    finished, rc = True, None
    with (work / "mutmut_run.log").open("w") as out:
        try:
            rc = subprocess.run(cmd, cwd=work, env=mutmut_env(), stdout=out, stderr=subprocess.STDOUT,
                                timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            finished = False
    return {"files": list(group.files), "tests": list(group.tests), "functions": list(group.functions),
            "note": group.note, "command": " ".join(cmd), "finished": finished, "returncode": rc,
            "wall_s": round(time.time() - t0, 1), "date": dt.datetime.now().isoformat(timespec="seconds"),
            "git_commit": git_commit()}


def mutmut_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/src first itself
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    return env


def collect(group: Group, work: Path) -> tuple[dict[str, dict[str, int]], list[dict]]:
    """Per-module status counts and the survivors (location, diff, stable key) of the run left in ``work``."""
    env = mutmut_env()
    listing = subprocess.run([mutmut_exe(), "results", "--all", "true"], cwd=work, env=env,
                             capture_output=True, text=True).stdout
    statuses: dict[str, str] = {}
    for row in listing.splitlines():
        key, _, status = row.strip().rpartition(": ")
        if key and status in STATUSES:
            statuses[key] = status
    if group.functions:
        statuses = {k: v for k, v in statuses.items() if any(fnmatch.fnmatch(k, g) for g in group.functions)}
    modules: dict[str, dict[str, int]] = {}
    for mutant, status in statuses.items():
        counts = modules.setdefault(function_of(mutant)[0], {s: 0 for s in ("killed", "survived", "timeout",
                                                                             "suspicious")})
        counts[status] = counts.get(status, 0) + 1
    left = sorted(k for k, v in statuses.items() if v in ("survived", "no tests", "suspicious"))
    # one process for every diff (``mutmut show`` per mutant costs a second each)
    script = ("import json, sys\nfrom mutmut.__main__ import get_diff_for_mutant\n"
              "print(json.dumps({n: get_diff_for_mutant(n) for n in json.load(sys.stdin)}))")
    diffs = json.loads(subprocess.run([str(Path(mutmut_exe()).with_name("python")), "-c", script], cwd=work,
                                      env=env, input=json.dumps(left), capture_output=True, text=True,
                                      check=True).stdout)
    survivors = []
    for mutant in left:
        module, fn = function_of(mutant)
        diff = diffs[mutant]
        old, new, rel = changed_lines(diff)
        path = ROOT / "src" / (module.replace(".", "/") + ".py")
        if not path.exists():
            path = path.with_suffix("") / "__init__.py"
        start = function_start(path, fn)
        where = f"{path.relative_to(ROOT)}:{start + rel - 1 if start and rel else '?'}"
        survivors.append({"mutant": mutant, "status": statuses[mutant], "location": where,
                          "key": stable_key(module, fn, old, new), "diff": changed_only(diff)})
    return modules, survivors


def summarise(result: dict, equivalent: dict[str, str]) -> list[dict]:
    """Merge reasons into the survivors and percentages into the counts; return the unexplained survivors."""
    explained: dict[str, int] = {}
    unexplained = []
    for s in result["survivors"]:
        s["reason"] = equivalent.get(s["key"])
        module = function_of(s["mutant"])[0]
        if s["reason"] is None:
            unexplained.append(s)
        else:
            explained[module] = explained.get(module, 0) + 1
    for module, c in result["modules"].items():
        run = sum(v for k, v in c.items() if k in STATUSES and k not in ("not checked", "skipped"))
        c["total"] = run
        c["explained"] = explained.get(module, 0)
        c["killed_pct"] = round(100.0 * c.get("killed", 0) / run, 1) if run else None
        c["killed_timeout_or_explained_pct"] = round(
            100.0 * (c.get("killed", 0) + c.get("timeout", 0) + c["explained"]) / run, 1) if run else None
    return unexplained


def git_commit() -> str:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src", "tests"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    return out + ("+dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--group", action="append", choices=sorted(GROUPS), help="run only these (repeatable)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/kdad_mutation"), help="scratch folder")
    ap.add_argument("--limit", type=float, default=3600.0, help="wall-clock limit per group, seconds")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--reuse", action="store_true",
                    help="do not run mutmut; re-read the last run's statuses in --work (e.g. after editing the "
                         "equivalent file)")
    ap.add_argument("--note", help="a note kept in the report (e.g. why a group was cut short)")
    ap.add_argument("--list", action="store_true", help="print the groups and exit")
    ap.add_argument("--prune", action="store_true",
                    help="drop explanations that no survivor of a finished group uses any more (code changed)")
    args = ap.parse_args()
    if args.list:
        for name, g in GROUPS.items():
            print(f"{name}: {' '.join(g.files)}\n    tests: {' '.join(g.tests)}\n    "
                  f"functions: {' '.join(g.functions) or 'all'}")
        return
    import torch

    equivalent = (yaml.safe_load(EQUIVALENT.read_text()) or {}) if EQUIVALENT.exists() else {}
    report = json.loads(args.out.read_text()) if args.out.exists() else {"groups": {}}
    for name in args.group or list(GROUPS):
        print(f"== {name}", flush=True)
        work = args.work / name
        if args.reuse:
            g = GROUPS[name]
            result = report["groups"].get(name) or {
                "files": list(g.files), "tests": list(g.tests), "functions": list(g.functions), "note": g.note,
                "command": "mutmut run --max-children 1 " + " ".join(g.functions), "finished": None,
                "date": dt.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit()}
        else:
            result = run_group(GROUPS[name], work, args.limit)
        result["modules"], result["survivors"] = collect(GROUPS[name], work)
        report["groups"][name] = result
        if args.note:
            report["note"] = args.note
        write_report(report, equivalent, args.out, torch.__version__)
    if args.prune and report["stale_explanations"]:
        prune_explanations(set(report["stale_explanations"]))


def stale_explanations(report: dict, equivalent: dict[str, str]) -> list[str]:
    """Keys of the equivalent file that belong to a module of a finished group and match none of its survivors:
    the code they explained has changed or gone."""
    owner = {m: r for r in report["groups"].values() for m in r["modules"]}
    used = {s["key"] for r in report["groups"].values() for s in r["survivors"]}
    stale = []
    for key in equivalent:
        where = key.split(": ", 1)[0]
        mods = [m for m in owner if where.startswith(m + ".")]
        if mods and key not in used and owner[max(mods, key=len)].get("finished"):  # longest: perlin, not package
            stale.append(key)
    return sorted(stale)


def prune_explanations(stale: set[str]) -> None:
    """Rewrite the equivalent file without ``stale``, keeping its two header comment lines."""
    lines = EQUIVALENT.read_text().splitlines()
    header = "".join(line + "\n" for line in lines[:2] if line.startswith("#"))
    kept = {k: v for k, v in (yaml.safe_load("\n".join(lines)) or {}).items() if k not in stale}
    EQUIVALENT.write_text(header + "\n" + yaml.safe_dump(kept, allow_unicode=True, width=1000, sort_keys=False))
    print(f"pruned {len(stale)} stale explanations from {EQUIVALENT.name}")


def write_report(report: dict, equivalent: dict[str, str], out: Path, torch_version: str) -> None:
    """Summarise every group in ``report``, write it to ``out`` and print the table and unexplained survivors."""
    unexplained = {}
    for result in report["groups"].values():
        for s in summarise(result, equivalent):
            unexplained[s["key"]] = f"TODO ({s['location']})"
    version = subprocess.run([mutmut_exe(), "--version"], capture_output=True, text=True).stdout.split()
    report["meta"] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "tool": "mutmut " + (version[-1] if version else "?"),
        "torch": torch_version, "python": sys.version.split()[0],
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "cpus": sorted(os.sched_getaffinity(0)), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "equivalent_file": str(EQUIVALENT.relative_to(ROOT)),
        "reading": "groups.<name>.modules: mutmut statuses per module (killed = a selected test failed; timeout = "
                   "the mutant ran past mutmut's limit; survived = every selected test passed; no tests = no "
                   "selected test reached the function). explained = survivors with a reason in the equivalent "
                   "file. Each survivor has location, diff, key (its entry in the equivalent file) and reason "
                   "(null = not yet explained).",
    }
    report["unexplained_survivors"] = len(unexplained)
    report["stale_explanations"] = stale_explanations(report, equivalent)
    report["not_run"] = sorted(set(GROUPS) - set(report["groups"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    for name, result in report["groups"].items():
        for module, c in result["modules"].items():
            print(f"{name:18s} {module:28s} killed {c['killed']:4d} survived {c['survived']:3d} "
                  f"timeout {c['timeout']:3d} explained {c['explained']:3d}  killed {c['killed_pct']}%  "
                  f"killed+timeout+explained {c['killed_timeout_or_explained_pct']}%")
    if unexplained:
        print(f"\n{len(unexplained)} unexplained survivors:\n"
              + yaml.safe_dump(unexplained, allow_unicode=True, width=1000, sort_keys=False))

if __name__ == "__main__":
    main()
