"""The harness as a user installs it: a built wheel (not the source tree, not an editable install)
in a fresh virtual environment runs the demo from a folder of its own. Whatever the harness reads
at run time (prompts, presets, bundled data) must be inside that wheel.

The fresh environment sees this environment's installed dependencies through a .pth line, so
nothing is downloaded; the harness itself comes only from the wheel (the editable install's hook
is not loaded that way, and PYTHONPATH is cleared)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _build_wheel(out: Path) -> Path:
    # From a clean copy: setuptools builds in the source folder, and a build/ left there by an
    # earlier build would put files in the wheel that the package data no longer names.
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "harness", src / "harness", ignore=shutil.ignore_patterns("__pycache__"))
    # Without build isolation when a setuptools new enough for pyproject.toml is here (offline,
    # and much faster); else pip fetches one into an isolated build environment.
    try:
        import setuptools

        isolation = ["--no-build-isolation"] if int(setuptools.__version__.split(".")[0]) >= 77 else []
    except ImportError:
        isolation = []
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(out), str(src)],
                   check=True, capture_output=True, text=True, cwd=out)
    (wheel,) = out.glob("harness-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh venv's python with the wheel installed in it."""
    env_dir = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, text=True, env=_clean_env())
    # Only now: pip must not see the harness this environment has installed and skip the wheel.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "deps.pth").write_text("\n".join(sorted(deps)) + "\n", encoding="utf-8")
    return python


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def test_the_wheel_holds_what_runs_read(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for must in ("harness/resources/prompts/default/question.txt", "harness/resources/prompts/authors/math/debate.txt",
                 "harness/resources/data/gsm8k-sample.jsonl", "harness/presets/demo.yaml"):
        assert must in names, f"{must} is missing from {wheel.name}"
    # every file of the source tree's resources is in the wheel
    shipped = {p.relative_to(REPO).as_posix() for p in (REPO / "harness" / "resources").rglob("*") if p.is_file()}
    assert shipped <= names, sorted(shipped - names)


@pytest.mark.slow
def test_the_installed_wheel_runs_the_demo_from_another_folder(installed, tmp_path):
    where = subprocess.run([installed, "-c", "import harness; print(harness.__file__)"], cwd=tmp_path,
                           env=_clean_env(), check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).resolve().is_relative_to(installed.parent.parent.resolve()), where
    run_dir = tmp_path / "runs" / "demo"
    proc = subprocess.run([installed, "-m", "harness.loop", "--run-dir", str(run_dir),
                           "--set", "task.n_train=12", "--set", "task.n_test=12", "--set", "finetune.iterations=1"],
                          cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    assert summary["finished"] and len(summary["iterations"]) == 2
