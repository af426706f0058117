"""CLI: help texts, print-config, clear errors."""

from __future__ import annotations

import pytest

from kdad.cli import build_parser, main


def test_every_option_has_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():  # type: ignore[union-attr]
        for action in p._actions:
            if action.dest != "help":
                assert action.help, f"kdad {name} {action.option_strings or action.dest} has no help"


def test_print_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--preset", "rd_cpu", "--set", "train.epochs=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "epochs: 3" in out and "efficientnet_lite0" in out


def test_user_error_is_one_clear_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fit", "--preset", "rd_cpu", "--set", "train.bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "valid keys" in err


def test_missing_data_root_is_reported(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["fit", "--preset", "rd_cpu", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err


def test_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "rd" in out and "stfpm" in out and "rd_paper" in out


def test_list_says_snl_is_designed_from_the_abstract(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    snl = next(line for line in out.splitlines() if line.strip().startswith("snl "))
    assert "designed from the abstract" in snl and "not the paper's method" in snl
    assert "snl_abstract" in out and "snl_paper (deprecated name of snl_abstract)" in out
    # each preset names its method: patchst_memory_cpu is PatchST's memory branch, not a method of its own
    assert any(line.split() == ["patchst_memory_cpu", "method:", "patchst"] for line in out.splitlines())


def test_set_values_reach_the_printed_config(capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    assert main(["fit", "--preset", "rd_cpu", "--set", "model.sigma=2.5", "--set", "train.threshold_quantile=0.9",
                 "--set", "data.image_size=128", "--set", "model.betas=[0.9, 0.99]", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["sigma"] == 2.5 and cfg["model"]["betas"] == [0.9, 0.99]
    assert cfg["train"]["threshold_quantile"] == 0.9 and cfg["data"]["image_size"] == 128


def _modules_after(argv: list[str], tmp_path) -> tuple[int, set[str]]:  # noqa: ANN001
    """Run `kdad ARGV` in a fresh interpreter; its exit code and the modules it imported."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import kdad

    code = ("import json, sys\nfrom kdad.cli import main\ntry:\n    rc = main(sys.argv[1:])\n"
            "except SystemExit as e:\n    rc = e.code\nprint('MODULES=' + json.dumps(sorted(sys.modules)))\n"
            "sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(Path(kdad.__file__).parents[1])}
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                         cwd=tmp_path, timeout=120)
    line = next(x for x in res.stdout.splitlines() if x.startswith("MODULES="))
    return res.returncode, set(json.loads(line[len("MODULES="):]))


@pytest.mark.parametrize("argv", [["list"], ["--help"], ["fit", "--bogus"], ["test", "kdad_demo"],
                                  ["fit", "--preset", "rd_cpu", "--data", "nope"]])
def test_quick_commands_do_not_import_torch(argv: list[str], tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "kdad_demo" / "run").mkdir(parents=True)
    (tmp_path / "kdad_demo" / "run" / "model.ckpt").write_bytes(b"")
    rc, modules = _modules_after(argv, tmp_path)
    assert "torch" not in modules, f"kdad {' '.join(argv)} imported torch (rc {rc})"


def test_list_papers_match_the_registry() -> None:
    from kdad.cli import method_papers
    from kdad.methods import METHODS

    assert method_papers() == {name: spec.paper for name, spec in METHODS.items()}


def test_run_folder_hint_points_inside(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    demo = tmp_path / "kdad_demo"
    (demo / "run").mkdir(parents=True)
    (demo / "run" / "model.ckpt").write_bytes(b"")
    for cmd in ("test", "export"):
        assert main([cmd, str(demo)]) == 2
        err = capsys.readouterr().err
        assert "has no model.ckpt" in err and str(demo / "run") in err
    assert main(["test", str(tmp_path / "nope")]) == 2
    assert "nope not found" in capsys.readouterr().err
