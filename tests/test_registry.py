"""The run's model registry: round trip, model fallback, corrupt files, the table printer."""

from __future__ import annotations

import json

import pytest

from harness.errors import DataError
from harness.registry import ModelEntry, Registry, main


def make_registry() -> Registry:
    reg = Registry(run="r", base_model="base")
    reg.upsert(ModelEntry(iteration=1, role="generator", agent=0, model_id="ft:g0-1", status="succeeded",
                          job_id="ftjob-1", file_id="file-1", data_path="iter-0/ftdata/generator-0.jsonl",
                          data_sha256="ab" * 32, n_examples=40, trained_tokens=12345, parent_model="base"))
    reg.upsert(ModelEntry(iteration=1, role="critic", agent=0, status="failed", job_id="ftjob-2",
                          error="Training file has 3 examples; at least 10 are required."))
    reg.upsert(ModelEntry(iteration=1, role="critic", agent=1, model_id="base", status="kept",
                          note="kept iteration 0 model: 4 examples < 10"))
    reg.upsert(ModelEntry(iteration=2, role="generator", agent=0, status="running", job_id="ftjob-3"))
    return reg


def test_round_trip(tmp_path):
    reg = make_registry()
    reg.save(tmp_path / "registry.json")
    again = Registry.load(tmp_path / "registry.json")
    assert again == reg
    assert again.get(1, "generator", 0).trained_tokens == 12345
    assert again.get(1, "critic", 2) is None


def test_upsert_replaces_same_key():
    reg = make_registry()
    reg.upsert(ModelEntry(iteration=1, role="critic", agent=0, model_id="ft:c0-1", status="succeeded"))
    assert len([e for e in reg.entries if e.key == (1, "critic", 0)]) == 1
    assert reg.get(1, "critic", 0).model_id == "ft:c0-1"


def test_models_for_falls_back_to_previous_or_base():
    reg = make_registry()
    assert reg.models_for(0, 2) == (["base", "base"], ["base", "base"])
    gens, crits = reg.models_for(1, 2)
    assert gens == ["ft:g0-1", "base"]
    assert crits == ["base", "base"]  # the failed critic job never becomes a model
    # iteration 2's generator job is still running: the iteration-1 model carries on
    assert reg.models_for(2, 2)[0] == ["ft:g0-1", "base"]


def test_corrupt_registry_names_file_and_field(tmp_path):
    path = tmp_path / "registry.json"
    data = json.loads(make_registry().model_dump_json())
    data["entries"][1]["role"] = "judge"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"registry\.json: field 'entries\.1\.role'"):
        Registry.load(path)
    path.write_text('{"run": "r", "base_model": ')
    with pytest.raises(DataError, match=r"registry\.json: not valid JSON"):
        Registry.load(path)
    data = json.loads(make_registry().model_dump_json())
    data["entries"].append(data["entries"][0])
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="two entries for iteration 1, generator, agent 0"):
        Registry.load(path)


def test_load_or_create(tmp_path):
    reg = Registry.load_or_create(tmp_path / "registry.json", run="r", base_model="b")
    assert reg.entries == [] and reg.base_model == "b"


def test_cli_prints_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    make_registry().save(tmp_path / "registry.json")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ft:g0-1" in out and "kept iteration 0 model" in out and "at least 10 are required" in out
    assert main([str(tmp_path / "missing")]) == 1
    assert "no registry here" in capsys.readouterr().err


def test_module_entry_point(tmp_path, cli):
    make_registry().save(tmp_path / "registry.json")
    proc = cli(str(tmp_path), module="harness.registry", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "ft:g0-1" in proc.stdout
