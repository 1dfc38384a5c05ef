"""The `local` finetuning provider: TRL SFT with a PEFT LoRA adapter, one subprocess per job.

Each job lives in run_dir/local-jobs/<job_id>/: spec.json (what to train, with the job's
metadata), status.json (the job's own once started), launch.json (the pid the provider started),
train.log, progress.jsonl and the adapter. All state is on disk, so a
new provider on the same run directory (a resumed loop) finds jobs by their metadata and never
starts a second one; a job whose process died without finishing reads as failed, with the last
lines of its log as the error. Jobs run in their own session: killing the loop does not kill a
job (like a hosted job, it keeps going and a resumed loop adopts it); `cancel` stops it.

A job's model id is its adapter name, f"{run}-it{iteration}-{role}{agent}", which is the name the
adapter is served under by vLLM. `FinetuneRequest.base_model` may be the base model (its served
name, models.base or its path), the model id of an adapter this provider trained (the job then
continues training that adapter: "finetune from the previous iteration"), or an adapter
directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Iterable

import harness
from harness.config import LocalFinetuneConfig, RunConfig
from harness.errors import FinetuneError, ServeError
from harness.providers.base import FinetuneProvider, FinetuneRequest, JobState, JobStatus
from harness.providers.local_train import JobFile, JobSpec, LoraSpec, read_status, write_status
from harness.serve import validate_adapter
from harness.fileio import write_json, write_model

MAX_NAME = 64
# Written by the provider only, when it starts a job's process: status.json belongs to the job
# from then on, so a launch never overwrites a status the job already wrote.
LAUNCH = "launch.json"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text)


def adapter_name(metadata: dict[str, str], fallback: str = "adapter") -> str:
    """f"{run}-it{iteration}-{role}{agent}" (run: metadata "run" or "harness_run"), restricted to
    [A-Za-z0-9._-] and <= 64 characters. A longer name gets a short hash of the whole (which
    keeps names distinct) and keeps f"{run}-" whole while that leaves room for the hash: the loop
    unloads its stale adapters by that prefix, so cutting into it would leave them loaded."""
    run = metadata.get("run") or metadata.get("harness_run") or fallback
    tail = f"it{metadata.get('iteration', 0)}-{metadata.get('role', 'model')}{metadata.get('agent', '')}"
    name = _safe(f"{run}-{tail}").strip("-.")
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    prefix, safe_tail = _safe(run).strip("-.") + "-", _safe(tail)
    room = MAX_NAME - len(prefix) - len(digest)
    if room >= 0:
        # The run prefix and the hash fit: the iteration/role/agent tail gives way, keeping its
        # end (role and agent) as far as it fits, e.g. "<run>-3f2a9c-critic0".
        kept = safe_tail[max(0, len(safe_tail) - room + 1):].lstrip("-.") if room > 1 else ""
        return prefix + digest + ("-" + kept if kept else "")
    # A run name too long to keep whole: its head, the hash and the whole tail.
    return (prefix[: MAX_NAME - len(safe_tail) - 8].rstrip("-.") + "-" + digest + "-" + safe_tail)[-MAX_NAME:]


def _log_tail(path: Path, lines: int = 12) -> str:
    if not path.exists():
        return "(no log written)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _names_job(args: list[str], job_dir: Path) -> bool:
    """Whether a command line carries exactly `--job-dir <job_dir>`. A substring test is not
    enough: job "...-1" is a prefix of job "...-10", whose process would pass for it."""
    want = str(job_dir)
    return f"--job-dir={want}" in args or any(a == "--job-dir" and b == want for a, b in zip(args, args[1:]))


def _launched_pid(job_dir: Path) -> int | None:
    """The pid the provider started for a job (launch.json), or None if it was never started."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads((job_dir / LAUNCH).read_text(encoding="utf-8"))["pid"])
    return None


def _alive(pid: int | None, job_dir: Path) -> bool:
    """True while the job's own process runs. Checks /proc where there is one, so a zombie
    (exited, not yet reaped) or a recycled pid of another program does not count as alive."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.exists():
        try:
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            args = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, IndexError):
            return False
        return state != "Z" and _names_job(args, job_dir)
    if Path("/proc/self").exists():
        return False
    try:  # no /proc (macOS): signal 0 only tells whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _dropped(n: int) -> str:
    return f"{n} example{'s' * (n != 1)} dropped: longer than finetune.local.max_length"


class LocalProvider(FinetuneProvider):
    name = "local"

    def __init__(self, run_dir: Path, cfg: LocalFinetuneConfig | None = None, *, base_model_path: str,
                 max_lora_rank: int | None = 8, base_names: Iterable[str] = (), seed: int = 0):
        self.cfg = cfg or LocalFinetuneConfig()
        self.jobs_dir = Path(run_dir).resolve() / "local-jobs"
        self.base_model_path = base_model_path
        self.max_lora_rank = max_lora_rank
        self.base_names = {base_model_path, *base_names}
        self.seed = seed
        self.python = self.cfg.python or sys.executable
        self._lock = asyncio.Lock()
        self._procs: dict[str, asyncio.subprocess.Process] = {}  # jobs launched by this instance
        self._exited = asyncio.Event()  # set (and replaced) whenever one of those processes exits
        self._watchers: set[asyncio.Task] = set()  # one per launched process, until it exits

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: Path) -> "LocalProvider":
        local = cfg.finetune.local
        named = local.base_model_path or cfg.serve.model
        if not named:
            raise FinetuneError("finetune.local.base_model_path (or serve.model): the weights to finetune are not set")
        from harness.models import resolve

        # `harness:<name>`: the folder harness.models caches; the name itself stays a base name.
        return cls(run_dir, local, base_model_path=resolve(named), max_lora_rank=cfg.serve.max_lora_rank,
                   base_names={named, cfg.models.base, cfg.serve.served_name}, seed=cfg.seed)

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: FinetuneRequest) -> JobState:
        existing = await self.find(request.metadata)
        if existing is not None and existing.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            return existing
        base_path, init_adapter = self._resolve_start(request.base_model)
        name = adapter_name(request.metadata)
        key = hashlib.sha256(json.dumps(request.metadata, sort_keys=True).encode()).hexdigest()[:8]
        attempt = 1 + sum(1 for _ in self.jobs_dir.glob(f"{name}-{key}-*"))
        job_id = f"{name}-{key}-{attempt}"
        hp = request.hyperparameters
        spec = JobSpec(
            job_id=job_id, adapter_name=name, metadata=request.metadata,
            training_file=str(Path(request.training_file).resolve()), base_model_path=base_path,
            init_adapter=init_adapter, full_finetune=self.cfg.full_finetune,
            lora=LoraSpec(r=self.cfg.r, alpha=self.cfg.alpha, dropout=self.cfg.dropout,
                          target_modules=self.cfg.target_modules),
            learning_rate=self.cfg.learning_rate * hp.learning_rate_multiplier, epochs=hp.n_epochs,
            batch_size=hp.batch_size, max_length=self.cfg.max_length,
            seed=request.seed if request.seed is not None else self.seed, device=self.cfg.device,
            max_lora_rank=self.max_lora_rank)
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=False)
        write_status(job_dir, JobFile(status="queued"))
        # spec.json last: a directory without it is an interrupted submit and is ignored.
        write_model(job_dir / "spec.json", spec)
        return await self.refresh(job_id)

    async def find(self, metadata: dict[str, str]) -> JobState | None:
        matches = [s for s in self._specs() if all(s.metadata.get(k) == v for k, v in metadata.items())]
        if not matches:
            return None
        newest = max(matches, key=lambda s: s.created_at)
        return await self.refresh(newest.job_id)

    async def refresh(self, job_id: str) -> JobState:
        await self._pump()
        state = self._state(job_id)
        proc = self._procs.get(job_id)
        if state.status.terminal and proc is not None:
            # Reap our own finished child now, while this event loop still runs.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)
            self._procs.pop(job_id, None)
        return state

    async def cancel(self, job_id: str) -> JobState:
        job_dir = self._job_dir(job_id)
        async with self._lock:
            status = read_status(job_dir)
            if status.status in ("queued", "running"):
                pid = status.pid or _launched_pid(job_dir)  # started, maybe not yet running
                if _alive(pid, job_dir):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGTERM)
                    proc = self._procs.get(job_id)
                    if proc is not None:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(proc.wait(), 30)
                # Read again: the job may have finished on its own while it was being stopped.
                status = read_status(job_dir)
                if status.status in ("queued", "running"):
                    status.status, status.finished_at = "cancelled", time.time()
                    write_status(job_dir, status)
        return await self.refresh(job_id)

    async def events(self, job_id: str, limit: int = 20) -> list[str]:
        job_dir = self._job_dir(job_id)
        lines = []
        progress = job_dir / "progress.jsonl"
        if progress.exists():
            for line in progress.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError):
                    p = json.loads(line)
                    lines.append(f"step {p['step']}: loss {p['loss']:.4f}, epoch {p.get('epoch') or 0:.2f}")
        status = read_status(job_dir)
        if status.dropped_examples:
            lines.append(_dropped(status.dropped_examples))
        if status.status in ("succeeded", "failed", "cancelled"):
            lines.append(f"job {status.status}" + (f": {status.error}" if status.error else ""))
        return lines[-limit:]

    def artifacts(self, model_ids: Iterable[str]) -> dict[str, str]:
        """{model id: adapter dir} for the ids this provider trained (newest succeeded job of
        each name); other ids (the base model, a hosted model) are left out. What the loop passes
        to `harness.serve.load_adapters` before a debate with finetuned agents."""
        wanted = set(model_ids)
        return {name: status.artifact_path for name, (_, status) in self._succeeded().items() if name in wanted}

    async def close(self) -> None:
        # Jobs keep running on purpose (a resumed loop adopts them); only drop the handles.
        self._procs.clear()
        for task in list(self._watchers):
            task.cancel()

    async def nap(self, seconds: float) -> None:
        """Sleep between polls, but wake as soon as a job this provider launched exits: its final
        status is written by then, and the next queued job can start at once. Without this, a
        job's end was seen up to a (backed-off) poll interval late, and with max_parallel_jobs
        the next job sat idle that long (benchmarks/results/train_throughput.md)."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._exited.wait(), seconds)

    async def _watch(self, proc: asyncio.subprocess.Process) -> None:
        await proc.wait()
        exited, self._exited = self._exited, asyncio.Event()
        exited.set()

    # ------------------------------------------------------------------ internals

    def _job_dir(self, job_id: str) -> Path:
        job_dir = self.jobs_dir / job_id
        if not (job_dir / "spec.json").exists():
            raise FinetuneError(f"no local finetuning job {job_id!r} under {self.jobs_dir}")
        return job_dir

    def _specs(self) -> list[JobSpec]:
        if not self.jobs_dir.exists():
            return []
        specs = []
        for path in sorted(self.jobs_dir.glob("*/spec.json")):
            with contextlib.suppress(ValueError, OSError):
                specs.append(JobSpec.model_validate_json(path.read_text(encoding="utf-8")))
        return specs

    def _succeeded(self) -> dict[str, tuple[JobSpec, JobFile]]:
        """{adapter name: (spec, status) of its newest succeeded job}."""
        found: dict[str, tuple[JobSpec, JobFile]] = {}
        for spec in sorted(self._specs(), key=lambda s: (s.created_at, s.job_id)):
            status = read_status(self.jobs_dir / spec.job_id)
            if status.status == "succeeded" and status.artifact_path:
                found[spec.adapter_name] = (spec, status)
        return found

    def _resolve_start(self, base_model: str) -> tuple[str, str | None]:
        """(weights to load, adapter to continue training or None) for a request's base_model."""
        if base_model in self.base_names:
            return self.base_model_path, None
        # The same job `artifacts()` serves under that name: training continues from the adapter
        # the agents were debating with, not from an older attempt.
        found = self._succeeded().get(base_model)
        if found is not None:
            spec, status = found
            if spec.full_finetune:
                return status.artifact_path, None
            return spec.base_model_path, status.artifact_path
        path = Path(base_model)
        if (path / "adapter_config.json").exists():
            return self.base_model_path, str(path.resolve())
        if (path / "config.json").exists():
            return str(path.resolve()), None
        raise FinetuneError(
            f"base_model {base_model!r} is neither the base model ({', '.join(sorted(self.base_names))}) nor an "
            f"adapter this run trained (none succeeded under that name in {self.jobs_dir}) nor an adapter directory")

    async def _pump(self) -> None:
        """Start queued jobs, oldest first, while fewer than max_parallel_jobs run."""
        async with self._lock:
            specs = sorted(self._specs(), key=lambda s: s.created_at)
            statuses = {s.job_id: read_status(self.jobs_dir / s.job_id) for s in specs}
            launched = {s.job_id: _launched_pid(self.jobs_dir / s.job_id) for s in specs}
            # A launched job still reads "queued" until its process writes its first status.
            running = sum(1 for s in specs if statuses[s.job_id].status in ("queued", "running")
                          and _alive(statuses[s.job_id].pid or launched[s.job_id], self.jobs_dir / s.job_id))
            for spec in specs:
                if running >= self.cfg.max_parallel_jobs:
                    break
                if statuses[spec.job_id].status == "queued" and launched[spec.job_id] is None:
                    await self._launch(spec)
                    running += 1

    async def _launch(self, spec: JobSpec) -> None:
        job_dir = self.jobs_dir / spec.job_id
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        # The job must import this harness even when the interpreter is another environment's.
        root = str(Path(harness.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        with open(job_dir / "train.log", "ab") as log:
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python, "-m", "harness.providers.local_train", "--job-dir", str(job_dir),
                    stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as e:
                write_status(job_dir, JobFile(status="failed", finished_at=time.time(),
                                              error=f"could not start {self.python}: {e}"))
                return
        self._procs[spec.job_id] = proc
        self._watchers.add(task := asyncio.create_task(self._watch(proc)))
        task.add_done_callback(self._watchers.discard)
        # Not status.json: the job writes that from its first instant, and a read-then-write
        # here could overwrite its "running" or even its final status with a stale "running".
        write_json(job_dir / LAUNCH, {"pid": proc.pid, "launched_at": time.time()})

    def _state(self, job_id: str) -> JobState:
        job_dir = self._job_dir(job_id)
        spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        status = read_status(job_dir)
        launched = _launched_pid(job_dir) if status.status == "queued" else None
        if launched is not None and _alive(launched, job_dir):
            # Started, and its process has not written yet: shown as running, not written.
            status.status, status.pid = "running", launched
        elif launched is not None:
            status = read_status(job_dir)  # it may have written between the two reads
            if status.status == "queued":
                status.status, status.pid, status.finished_at = "failed", launched, time.time()
                status.error = f"the training process (pid {launched}) ended without finishing, before it " \
                               f"wrote any status; last lines of {job_dir / 'train.log'}:\n" \
                               f"{_log_tail(job_dir / 'train.log')}"
                write_status(job_dir, status)
        if status.status == "running" and not _alive(status.pid, job_dir):
            status = read_status(job_dir)  # it may have finished between the two reads
            if status.status == "running":
                status.status, status.finished_at = "failed", time.time()
                status.error = f"the training process (pid {status.pid}) ended without finishing; " \
                               f"last lines of {job_dir / 'train.log'}:\n{_log_tail(job_dir / 'train.log')}"
                write_status(job_dir, status)
        elif status.status == "failed" and status.error and "train.log" not in status.error:
            status.error += f"\nlast lines of {job_dir / 'train.log'}:\n{_log_tail(job_dir / 'train.log')}"
        if status.status == "succeeded" and not spec.full_finetune and self.max_lora_rank is not None:
            try:  # every adapter is checked against what the server can load before it is registered
                validate_adapter(status.artifact_path or job_dir / "adapter", max_lora_rank=self.max_lora_rank)
            except ServeError as e:
                status.status, status.error = "failed", f"the adapter cannot be served: {e}"
                write_status(job_dir, status)
        latest = None
        if status.status == "running":
            latest = f"step {status.step}/{status.total_steps or '?'}" + \
                (f", loss {status.loss:.4f}" if status.loss is not None else "") + \
                (f"; {_dropped(status.dropped_examples)}" if status.dropped_examples else "")
        succeeded = status.status == "succeeded"
        return JobState(
            job_id=job_id, provider=self.name, status=JobStatus.normalize(status.status), raw_status=status.status,
            model_id=spec.adapter_name if succeeded else None,
            artifact_path=status.artifact_path if succeeded else None, trained_tokens=status.trained_tokens,
            error=status.error, latest_event=latest or (status.error.splitlines()[0] if status.error else None),
            created_at=spec.created_at, finished_at=status.finished_at, metadata=spec.metadata)


# The name the loop imports.
LocalLoraProvider = LocalProvider
