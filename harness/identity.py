"""A run's identity and the settings its finished work was made with.

The run id tags every finetuning job (metadata `harness_run`), so a resumed run finds its jobs
instead of creating them again. A new id would mean a second set of jobs, so the id lives where
losing one file cannot change it:

- `run.json` (this module's `RunIdentity`): the id, and the frozen settings with their fingerprint;
- `registry.json` (its `run` field) and the first line of `config.yaml` (a comment);
- the provider's own jobs: each carries the run id and the sha256 of its training file, and the
  training files are in the run directory (`iter-<k>/ftdata/`), so the id is found again even
  when every file above is gone.

`establish` runs before anything is created: it gathers the id from all of these (they must
agree), rebuilds a missing or damaged registry from the provider's job list, adopts jobs the
registry does not know, and writes the identity back everywhere.

The frozen settings are every config field except `RESUMABLE_FIELDS`; `frozen_changes` compares
them by value, so a hand edit of config.yaml is caught as surely as a `--set`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from harness.config import RunConfig, config_to_yaml
from harness.errors import DataError
from harness.fileio import write_atomic, write_model
from harness.providers.base import FinetuneProvider, JobState, JobStatus
from harness.registry import ModelEntry, Registry

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
# What a resumed run may change: where and how fast to call, how much to spend, how far to go.
# (The endpoint's pacing fields come with the rate-limit pacing change; a prefix that matches no
# field changes nothing.)
RESUMABLE_FIELDS = ("budget.", "endpoint.concurrency", "endpoint.timeout_s", "endpoint.max_retries",
                    "endpoint.base_url", "endpoint.api_key_env", "endpoint.rpm_limit", "endpoint.tpm_limit",
                    "endpoint.rate_limit_wait_s", "endpoint.max_tokens_param", "serve.",
                    "finetune.iterations",
                    "endpoint.batch",  # how calls travel (directly or in batches), not what they answer
                    "finetune.poll_interval_s", "finetune.paused_timeout_s",
                    # how many jobs at once, on which GPUs, with how many CPU threads: not what they learn
                    "finetune.local.max_parallel_jobs", "finetune.local.threads", "finetune.local.devices",
                    "finetune.local.share_devices",
                    # how the next Azure deployments are made and followed, not what the models learn
                    "finetune.azure.sku", "finetune.azure.capacity", "finetune.azure.api_version",
                    "finetune.azure.management_url", "finetune.azure.management_token_env",
                    "finetune.azure.deploy_poll_s", "finetune.azure.deploy_timeout_s",
                    "tracking.",  # where the numbers are sent, not what they are
                    "hardware.")  # the GPUs --dry-run plans for; read by nothing else
_HEADER_RE = re.compile(r"^# harness run id: (\S+)")


class RunIdentity(BaseModel):
    """run.json, written when a run starts (and again while it has finished nothing)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    run: str  # tags every finetuning job of the run (metadata harness_run)
    created_at: float
    fingerprint: str  # sha256 of `frozen`
    frozen: dict[str, Any]  # every setting finished work depends on, dotted name -> value
    config: dict[str, Any]  # the whole resolved config at start: restores a lost config.yaml


# ----------------------------------------------------------------------------- settings

def flat(data: dict, prefix: str = "") -> dict[str, Any]:
    """{"debate.agents": 3, ...}: a nested config dump as dotted leaf fields."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def frozen_settings(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in flat(cfg.model_dump(mode="json")).items() if not k.startswith(RESUMABLE_FIELDS)}


def fingerprint(frozen: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(frozen, sort_keys=True, default=str).encode()).hexdigest()


def frozen_changes(saved: dict[str, Any], cfg: RunConfig) -> list[tuple[str, Any, Any]]:
    """(field, saved value, new value) for every frozen field whose value differs. A field the
    saved settings do not know (added to the harness since the run started) is not a change."""
    now = frozen_settings(cfg)
    return [(k, saved[k], now[k]) for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k]]


def new_run_id(name: str) -> str:
    # Unique per run directory, so two runs that share a name never pick up each other's jobs;
    # kept to characters and a length that adapter names can carry whole (the loop unloads stale
    # adapters by it).
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")[:40] or "run"
    return f"{safe}-{secrets.token_hex(4)}"


def config_header(run: str) -> str:
    return f"# harness run id: {run}  (it tags this run's finetuning jobs; keep this line)\n"


def header_run_id(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            m = _HEADER_RE.match(f.readline())
    except OSError:
        return None
    return m.group(1) if m else None


def write_config(run_dir: Path, cfg: RunConfig, run: str | None) -> None:
    write_atomic(Path(run_dir) / "config.yaml", (config_header(run) if run else "") + config_to_yaml(cfg))


def load_identity(run_dir: Path) -> RunIdentity | None:
    """run.json, or None when it is missing or damaged (the id is then recovered elsewhere)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return RunIdentity.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        log.warning("%s is damaged (%s); the run id is recovered from registry.json or the provider", path, e)
        return None


def finished_work(run_dir: Path) -> list[str]:
    """What the run has finished that later settings could contradict (empty: nothing yet, so
    every setting may still change): debate records, training data, registered or started jobs."""
    run_dir = Path(run_dir)
    found = []
    for path in sorted(run_dir.glob("iter-*/debate-*.jsonl")):
        with open(path, "rb") as f:  # one whole line is a finished record
            if b"\n" in f.read(1 << 20):
                found.append(f"debate records in {path.relative_to(run_dir)}")
    found += [f"training data in {p.relative_to(run_dir)}" for p in sorted(run_dir.glob("iter-*/ftdata")) if any(p.iterdir())]
    for folder, what in (("local-jobs", "*/spec.json"), ("simulator/jobs", "*.json")):
        if any((run_dir / folder).glob(what)):
            found.append(f"finetuning jobs in {folder}/")
    try:
        if Registry.load(run_dir / "registry.json").entries:
            found.append("models in registry.json")
    except DataError:
        if (run_dir / "registry.json").exists():
            found.append("registry.json (damaged)")
    return found


# ----------------------------------------------------------------------------- establishing

def _read_registry(run_dir: Path) -> tuple[Registry | None, str | None]:
    path = run_dir / "registry.json"
    if not path.exists():
        return None, "missing"
    try:
        return Registry.load(path), None
    except DataError as e:
        return None, f"damaged ({e})"


def _data_files(run_dir: Path) -> list[tuple[int, Path, str]]:
    """(iteration trained, file, sha256) of every training file in the run directory."""
    out = []
    for d in sorted(run_dir.glob("iter-*/ftdata")):
        k = d.parent.name.removeprefix("iter-")
        if not k.isdigit():
            continue
        for path in sorted(d.glob("*.jsonl")):
            out.append((int(k) + 1, path, hashlib.sha256(path.read_bytes()).hexdigest()))
    return out


async def _ids_from_provider(run_dir: Path, provider: FinetuneProvider) -> set[str]:
    """Run ids of the provider's jobs that trained on this run directory's data files."""
    for target, _, sha in _data_files(run_dir):
        jobs = await provider.jobs({"iteration": str(target), "data_sha256": sha[:16]})
        ids = {j.metadata["harness_run"] for j in jobs if j.metadata.get("harness_run")}
        if ids:
            return ids
    return set()


def _pick(states: list[JobState]) -> JobState:
    """Of several jobs for one model: the newest that is not failed or cancelled, else the newest."""
    states = sorted(states, key=lambda s: (s.created_at or 0, s.job_id), reverse=True)
    return next((s for s in states if s.status not in (JobStatus.FAILED, JobStatus.CANCELLED)), states[0])


async def adopt_jobs(registry: Registry, provider: FinetuneProvider, run_dir: Path, cfg: RunConfig) -> list[ModelEntry]:
    """Register every job the provider holds for this run that the registry has no entry for
    (a registry lost, damaged, or killed before it recorded a job just created)."""
    groups: dict[tuple[int, str, int], list[JobState]] = defaultdict(list)
    for state in await provider.jobs({"harness_run": registry.run}):
        md = state.metadata
        try:
            key = (int(md["iteration"]), md["role"], int(md["agent"]))
        except (KeyError, ValueError):
            continue
        if key[1] in ("generator", "critic"):
            groups[key].append(state)
    files = {sha[:16]: (path, sha) for _, path, sha in _data_files(run_dir)}
    adopted = []
    for (iteration, role, agent), states in sorted(groups.items()):
        if registry.get(iteration, role, agent) is not None:
            continue
        s = _pick(states)
        path, sha = files.get(s.metadata.get("data_sha256", ""), (None, None))
        status = s.status.value if s.status is not JobStatus.UNKNOWN else "unknown"
        entry = ModelEntry(
            iteration=iteration, role=role, agent=agent, provider=provider.name, parent_model=s.base_model,
            job_id=s.job_id, file_id=s.file_id, status=status, error=s.error, trained_tokens=s.trained_tokens,
            model_id=s.model_id if s.status is JobStatus.SUCCEEDED else None,
            data_path=str(path.relative_to(run_dir)) if path else None, data_sha256=sha,
            n_examples=sum(1 for line in path.read_bytes().splitlines() if line.strip()) if path else None,
            created_at=s.created_at or time.time(), finished_at=s.finished_at,
            note="recovered from the provider's job list")
        registry.upsert(entry)
        adopted.append(entry)
    for e in adopted:  # the parent, where the provider does not report it: the stage's own rule
        if e.parent_model is None:
            e.parent_model = (cfg.models.base if cfg.finetune.start_from == "base"
                              else registry.model_for(e.iteration - 1, e.role, e.agent))
    return adopted


async def establish(cfg: RunConfig, run_dir: Path, provider: FinetuneProvider | None) -> tuple[RunIdentity, Registry, list[str]]:
    """The run's identity and registry, recovered and checked before anything is created;
    returns them with notes for the user on anything that was rebuilt."""
    run_dir = Path(run_dir)
    notes: list[str] = []
    identity = load_identity(run_dir)
    registry, reg_problem = _read_registry(run_dir)
    sources: dict[str, list[str]] = defaultdict(list)
    if identity is not None:
        sources[identity.run].append(RUN_FILE)
    if registry is not None:
        sources[registry.run].append("registry.json")
    header = header_run_id(run_dir / "config.yaml")
    if header is not None:
        sources[header].append("config.yaml")
    if not sources and provider is not None:
        for rid in await _ids_from_provider(run_dir, provider):
            sources[rid].append(f"the {provider.name} provider's jobs trained on this run's data")
    if len(sources) > 1:
        found = "; ".join(f"{rid} in {', '.join(where)}" for rid, where in sources.items())
        raise DataError(
            f"{run_dir}: the run's id is not the same everywhere ({found}). The id tags the run's finetuning jobs, "
            f"so a wrong one would start them again. Keep the right one: edit the others (\"run\" in "
            f"{RUN_FILE} and registry.json, the first line of config.yaml) to match, then resume")
    run_id = next(iter(sources)) if sources else new_run_id(cfg.name)
    recovered_from = sources.get(run_id, [])
    finished = finished_work(run_dir)

    if registry is None:
        if reg_problem and reg_problem.startswith("damaged"):
            aside = run_dir / f"registry.json.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
            (run_dir / "registry.json").replace(aside)
            notes.append(f"registry.json was {reg_problem}; it was moved to {aside.name} and rebuilt")
        elif finished:
            notes.append("registry.json was missing; it was rebuilt")
        registry = Registry(run=run_id, base_model=cfg.models.base)
    if registry.base_model != cfg.models.base:
        if registry.entries:
            raise DataError(f"{run_dir / 'registry.json'}: its models were finetuned from {registry.base_model!r}, but "
                            f"models.base is now {cfg.models.base!r}; put models.base back in config.yaml")
        registry.base_model = cfg.models.base  # nothing trained yet: the fixed base model counts
    if provider is not None and sources:  # a new id has no jobs yet
        adopted = await adopt_jobs(registry, provider, run_dir, cfg)
        if adopted:
            notes.append(f"{len(adopted)} finetuning job(s) of run {run_id} found at the provider were registered "
                         f"again (no job was created twice)")
    registry.save(run_dir / "registry.json")

    if identity is None or not finished or identity.run != run_id:
        frozen = frozen_settings(cfg)
        identity = RunIdentity(run=run_id, created_at=identity.created_at if identity else time.time(),
                               fingerprint=fingerprint(frozen), frozen=frozen, config=cfg.model_dump(mode="json"))
        if finished and RUN_FILE not in recovered_from:
            notes.append(f"{RUN_FILE} was missing or damaged; run id {run_id} was recovered from "
                         f"{', '.join(recovered_from) or 'nowhere (no job had been created)'}")
        write_model(run_dir / RUN_FILE, identity)
    if header != run_id:
        write_config(run_dir, cfg, run_id)
    return identity, registry, notes
