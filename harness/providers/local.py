"""The `local` finetuning provider: TRL SFT with a PEFT LoRA adapter, one process per job.

Each job lives in <jobs dir>/<job_id>/ (default <run dir>/local-jobs/): spec.json (what to
train, with the job's metadata), status.json (the job's own once started), launch.json (how the
runner started it: a pid, or a Ray submission id), train.log, progress.jsonl and the adapter.
A runner (harness/providers/runners/) starts the job's process: a subprocess on this machine
(one GPU per job from `finetune.local.devices`) or a Ray job on a cluster. All state is on disk,
so a new provider on the same run directory (a resumed loop) finds jobs by their metadata and
never starts a second one; a job whose process died without finishing reads as failed, with the
last lines of its log as the error. Jobs outlive the loop on purpose (like a hosted job, a job
keeps going and a resumed loop adopts it); `cancel` stops one, and `python -m harness.jobs
RUN_DIR --stop` stops every job of an abandoned run.

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
import re
import shutil
import sys
import time
from pathlib import Path
from typing import AsyncIterator, Iterable

from harness.config import LocalFinetuneConfig, RunConfig
from harness.errors import FinetuneError, ServeError
from harness.fileio import write_model
from harness.providers.base import FinetuneProvider, FinetuneRequest, JobState, JobStatus, LossPoint
from harness.providers.local_train import JobFile, JobSpec, LoraSpec, read_status, write_status
from harness.providers.local_dist import has_checkpoint
from harness.providers.resident_train import CANCEL, group_key
from harness.providers.runners import LAUNCH, TRAIN_MODULE, JobRunner, Launch, LaunchFailed, Liveness, make_runner, read_launch
from harness.serve import validate_adapter

MAX_NAME = 64


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


def _log_tail(path: Path, lines: int = 20) -> str:
    if not path.exists():
        return "(no log written)"
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(empty log)"


def _dropped(n: int) -> str:
    return f"{n} example{'s' * (n != 1)} dropped: longer than finetune.local.max_length"


class LocalProvider(FinetuneProvider):
    name = "local"

    def __init__(self, run_dir: Path, cfg: LocalFinetuneConfig | None = None, *, base_model_path: str,
                 max_lora_rank: int | None = 8, base_names: Iterable[str] = (), seed: int = 0,
                 runner: JobRunner | None = None):
        self.cfg = cfg or LocalFinetuneConfig()
        self.run_dir = Path(run_dir).resolve()
        self.link = self.run_dir / "local-jobs"
        if self.cfg.jobs_dir:
            # Shared storage: one folder per run directory, which <run dir>/local-jobs links to.
            digest = hashlib.sha256(str(self.run_dir).encode()).hexdigest()[:8]
            self.jobs_dir = Path(self.cfg.jobs_dir).expanduser().resolve() / f"{self.run_dir.name}-{digest}"
        else:
            self.jobs_dir = self.link
        self.base_model_path = base_model_path
        self.max_lora_rank = max_lora_rank
        self.base_names = {base_model_path, *base_names}
        self.seed = seed
        self.python = self.cfg.python or sys.executable
        self.runner = runner or make_runner(self.cfg, self.python)
        self._lock = asyncio.Lock()
        # Jobs submitted inside `batch()` that can share a base model train in one resident
        # process (finetune.local.trainer); only the subprocess runner of local_train has one.
        self.resident = (self.cfg.resident and hasattr(self.runner, "launch_group")
                         and self.runner.module == TRAIN_MODULE)
        self._batching = 0
        self._relaunched: set[str] = set()  # jobs this instance put back in the queue to resume

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

    def _new_job_dir(self, metadata: dict[str, str]) -> tuple[str, str, Path]:
        """(adapter name, job id, its new directory): the id carries the metadata's hash and an
        attempt number, so a redone job never reuses a failed one's folder."""
        name = adapter_name(metadata)
        key = hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()[:8]
        attempt = 1 + sum(1 for _ in self.jobs_dir.glob(f"{name}-{key}-*"))
        job_id = f"{name}-{key}-{attempt}"
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir(parents=True, exist_ok=False)
        return name, job_id, job_dir

    async def submit(self, request: FinetuneRequest) -> JobState:
        existing = await self.find(request.metadata)
        if existing is not None and existing.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            return existing
        await self.runner.check()  # an unreachable or too small cluster fails here, before any file is written
        base_path, init_adapter = self._resolve_start(request.base_model)
        name, job_id, job_dir = self._new_job_dir(request.metadata)
        self._link_jobs_dir()
        training_file = Path(request.training_file).resolve()
        if self.cfg.jobs_dir and training_file.exists():
            # The run directory may be local to this machine: the job reads its own copy.
            shutil.copyfile(training_file, job_dir / "training.jsonl")
            training_file = job_dir / "training.jsonl"
        hp = request.hyperparameters
        seed = self.cfg.seed if self.cfg.seed is not None else request.seed if request.seed is not None else self.seed
        sharding = ("fsdp" if self.cfg.full_finetune else "ddp") if self.cfg.sharding == "auto" else self.cfg.sharding
        spec = JobSpec(
            job_id=job_id, adapter_name=name, metadata=request.metadata,
            training_file=str(training_file), base_model_path=base_path,
            init_adapter=init_adapter, full_finetune=self.cfg.full_finetune,
            lora=LoraSpec(r=self.cfg.r, alpha=self.cfg.alpha, dropout=self.cfg.dropout,
                          target_modules=self.cfg.target_modules),
            learning_rate=self.cfg.learning_rate * hp.learning_rate_multiplier, epochs=hp.n_epochs,
            batch_size=hp.batch_size, max_steps=request.max_steps, max_length=self.cfg.max_length,
            seed=seed, device=self.cfg.device, threads=self.cfg.threads, max_lora_rank=self.max_lora_rank,
            processes=self.cfg.processes_per_job,
            sharding=sharding,
            gradient_accumulation_steps=self.cfg.accumulation_steps(hp.batch_size),
            lr_scheduler=self.cfg.lr_scheduler, warmup_ratio=self.cfg.warmup_ratio, bf16=self.cfg.bf16,
            checkpoint_steps=self.cfg.checkpoint_steps, checkpoint_minutes=self.cfg.checkpoint_minutes)
        write_status(job_dir, JobFile(status="queued"))
        # spec.json last: a directory without it is an interrupted submit and is ignored.
        write_model(job_dir / "spec.json", spec)
        return await self.refresh(job_id)

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        """Jobs submitted inside the block are launched when it ends, together: with the resident
        trainer, all queued LoRA jobs on one base model as ONE process."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                await self._pump()

    async def find(self, metadata: dict[str, str]) -> JobState | None:
        matches = [s for s in self._specs() if all(s.metadata.get(k) == v for k, v in metadata.items())]
        if not matches:
            return None
        newest = max(matches, key=lambda s: s.created_at)
        return await self.refresh(newest.job_id)

    async def jobs(self, metadata: dict[str, str]) -> list[JobState]:
        """Every job under local-jobs/ whose spec.json metadata matches, newest first."""
        matches = [s for s in self._specs() if all(s.metadata.get(k) == v for k, v in metadata.items())]
        return [await self.refresh(s.job_id) for s in sorted(matches, key=lambda s: (s.created_at, s.job_id), reverse=True)]

    async def refresh(self, job_id: str) -> JobState:
        await self._pump()
        return await self._state(job_id)

    async def cancel(self, job_id: str) -> JobState:
        job_dir = self._job_dir(job_id)
        async with self._lock:
            status = read_status(job_dir)
            launch = self._launch_of(job_dir)
            if status.status in ("queued", "running"):
                (job_dir / CANCEL).touch()  # a resident process skips the job from its next turn on
                if launch is not None and not await self._shares_process(job_dir, launch):
                    await self.runner.stop(job_dir, launch)
                # Read again: the job may have finished on its own while it was being stopped.
                status = read_status(job_dir)
                if status.status in ("queued", "running"):
                    status.status, status.finished_at = "cancelled", time.time()
                    write_status(job_dir, status)
        return await self.refresh(job_id)

    async def _shares_process(self, job_dir: Path, launch: Launch) -> bool:
        """Whether another job still training in the same resident process: then that process
        must go on (it drops this job before its next step); the last job's cancel stops it."""
        for other in launch.group:
            other_dir = self.jobs_dir / other
            if other_dir == job_dir or (other_dir / CANCEL).exists():
                continue
            if read_status(other_dir).status in ("queued", "running"):
                probe = await self.runner.probe(other_dir, launch)
                if probe.state in (Liveness.PENDING, Liveness.RUNNING):
                    return True
        return False

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

    async def loss_curve(self, job_id: str) -> list[LossPoint]:
        """From the job's progress.jsonl (one line per logged step, written by local_train)."""
        points = []
        progress = self._job_dir(job_id) / "progress.jsonl"
        if progress.exists():
            for line in progress.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    p = json.loads(line)
                    points.append(LossPoint(step=int(p["step"]), loss=float(p["loss"])))
        return points

    def artifacts(self, model_ids: Iterable[str]) -> dict[str, str]:
        """{model id: adapter dir} for the ids this provider trained (newest succeeded job of
        each name); other ids (the base model, a hosted model) are left out. What the loop passes
        to `harness.serve.load_adapters` before a debate with finetuned agents."""
        wanted = set(model_ids)
        return {name: status.artifact_path for name, (_, status) in self._succeeded().items() if name in wanted}

    async def placements(self) -> list[tuple[JobState, str | None]]:
        """Every job of this run, oldest first, with where it runs (None: never started);
        starts nothing."""
        out = []
        for spec in sorted(self._specs(), key=lambda s: s.created_at):
            launch = read_launch(self.jobs_dir / spec.job_id)
            out.append((await self._state(spec.job_id), self.runner.where(launch) if launch else None))
        return out

    async def stop_all(self) -> list[JobState]:
        """Cancel every job of this run that has not ended: those never started first, so that
        stopping a running one frees no slot for them. For a run that is abandoned."""
        states = [state for state, _ in await self.placements() if not state.status.terminal]
        states.sort(key=lambda st: read_launch(self.jobs_dir / st.job_id) is not None)
        return [await self.cancel(st.job_id) for st in states]

    async def close(self) -> None:
        # Jobs keep running on purpose (a resumed loop adopts them); nothing to stop here.
        return None

    async def nap(self, seconds: float) -> None:
        """Sleep between polls, but wake within a second once a job of this run ends (its
        status.json turns final): the next queued job can start at once. Without this a job's
        end was seen up to a backed-off poll interval late, and with max_parallel_jobs the next
        job sat idle that long (benchmarks/results/train_throughput.md). Status files, not
        process handles: they work for every runner (a subprocess, a Ray job on another node)."""
        deadline = time.monotonic() + seconds
        before = self._open_jobs()
        while (left := deadline - time.monotonic()) > 0:
            await asyncio.sleep(min(1.0, left))
            if any(read_status(self.jobs_dir / job_id).status not in ("queued", "running") for job_id in before):
                return

    def _open_jobs(self) -> list[str]:
        """This run's jobs that have not ended."""
        return [s.job_id for s in self._specs()
                if read_status(self.jobs_dir / s.job_id).status in ("queued", "running")]

    # ------------------------------------------------------------------ internals

    def _job_dir(self, job_id: str) -> Path:
        job_dir = self.jobs_dir / job_id
        if not (job_dir / "spec.json").exists():
            raise FinetuneError(f"no local finetuning job {job_id!r} under {self.jobs_dir}")
        return job_dir

    def _launch_of(self, job_dir: Path) -> Launch | None:
        launch = read_launch(job_dir)
        if launch is not None and launch.runner != self.runner.name:
            raise FinetuneError(f"job {job_dir.name} was started by the {launch.runner} runner, but finetune.local.runner "
                                f"is {self.runner.name}; a run keeps the runner it started with")
        return launch

    def _link_jobs_dir(self) -> None:
        """<run dir>/local-jobs -> the jobs folder on shared storage, so every job's files (its
        train.log too) are reachable from the run directory."""
        if self.jobs_dir == self.link or self.link.is_symlink():
            return
        if self.link.exists():
            raise FinetuneError(f"{self.link} is a folder of its own, so finetune.local.jobs_dir ({self.cfg.jobs_dir}) "
                                f"cannot be linked there; this run started without jobs_dir: resume it without it")
        self.link.parent.mkdir(parents=True, exist_ok=True)
        self.link.symlink_to(self.jobs_dir, target_is_directory=True)

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
        """Start queued jobs, oldest first, while the runner has room (max_parallel_jobs, one
        job per listed GPU); complete launches a killed loop cut short."""
        async with self._lock:
            active: list[Launch] = []
            waiting: list[tuple[Path, Launch | None]] = []
            for spec in sorted(self._specs(), key=lambda s: s.created_at):
                job_dir = self.jobs_dir / spec.job_id
                status = read_status(job_dir)
                if status.status not in ("queued", "running"):
                    continue
                launch = self._launch_of(job_dir)
                if launch is None:
                    if status.status == "queued":
                        waiting.append((job_dir, None))
                    continue
                probe = await self.runner.probe(job_dir, launch)
                if probe.state in (Liveness.PENDING, Liveness.RUNNING):
                    active.append(launch)
                elif probe.state is Liveness.MISSING and status.status == "queued":
                    waiting.append((job_dir, launch))  # recorded, never reached the runner
            if self._batching:
                return  # `batch()` launches them together when it ends
            for group, previous in self._groups(waiting):
                # A resident process counts once, whatever the number of jobs it trains.
                if self.runner.slots(list({launch.pid or id(launch): launch for launch in active}.values())) <= 0:
                    break
                try:
                    # A relaunched job resumes from a checkpoint in the trainer's own layout:
                    # with the resident trainer on, the resident process reads it, even alone.
                    if len(group) > 1 or (self.resident and group[0].name in self._relaunched):
                        active.append(await self.runner.launch_group(group, active))  # type: ignore[attr-defined]
                    else:
                        active.append(await self.runner.launch(group[0], active, previous))
                except LaunchFailed as e:
                    for job_dir in group:
                        write_status(job_dir, JobFile(status="failed", finished_at=time.time(), error=str(e)))

    def _groups(self, waiting: list[tuple[Path, Launch | None]]) -> list[tuple[list[Path], Launch | None]]:
        """The waiting jobs as launches, oldest first: with the resident trainer the LoRA jobs
        that can share a process (same base model, device, threads) form one; a job whose
        launch was cut short (`previous`) completes it alone."""
        if not self.resident:
            return [([job_dir], previous) for job_dir, previous in waiting]
        groups: dict[object, list[Path]] = {}
        out: list[tuple[list[Path], Launch | None]] = []
        for job_dir, previous in waiting:
            spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
            key = group_key(spec)
            if previous is not None or key is None:
                out.append(([job_dir], previous))
            elif key in groups:
                groups[key].append(job_dir)
            else:
                groups[key] = [job_dir]
                out.append((groups[key], None))
        return out

    def _relaunch(self, job_dir: Path, spec: JobSpec, launch: Launch) -> bool:
        """A job whose process died (a killed loop's machine rebooted, the resident process was
        killed) but left a checkpoint goes back to the queue, to resume from it, instead of
        failing and being redone from scratch; once per job and provider instance, so a job
        that dies again and again still ends failed."""
        if (job_dir.name in self._relaunched or (job_dir / CANCEL).exists()
                or not has_checkpoint(job_dir, spec.processes)):
            return False
        self._relaunched.add(job_dir.name)
        with open(job_dir / "train.log", "a", encoding="utf-8") as log:
            log.write(f"the training process ({self.runner.where(launch)}) ended without finishing; relaunched to "
                      f"resume from {job_dir / 'checkpoints'}\n")
        (job_dir / LAUNCH).unlink(missing_ok=True)
        status = read_status(job_dir)
        status.status, status.pid = "queued", None
        write_status(job_dir, status)
        return True

    async def _state(self, job_id: str) -> JobState:
        job_dir = self._job_dir(job_id)
        spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        status = read_status(job_dir)
        launch = self._launch_of(job_dir)
        waiting = None  # why a launched job has not started: the runner's words
        if launch is not None and status.status in ("queued", "running"):
            probe = await self.runner.probe(job_dir, launch)
            if probe.state is Liveness.RUNNING and status.status == "queued":
                # Started, and its process has not written yet: shown as running, not written.
                status.status, status.pid = "running", launch.pid
            elif probe.state is Liveness.PENDING:
                waiting = probe.detail
            elif probe.state is Liveness.ENDED or (probe.state is Liveness.MISSING and status.status == "running"):
                await self.runner.collect_logs(job_dir, launch, final=True)
                status = read_status(job_dir)  # it may have finished between the two reads
                if status.status in ("queued", "running") and self._relaunch(job_dir, spec, launch):
                    return await self._state(job_id)
                if status.status in ("queued", "running"):
                    before = ", before it wrote any status" if status.status == "queued" else ""
                    status.status, status.pid = "failed", status.pid or launch.pid
                    status.finished_at = time.time()
                    status.error = f"the training process ({self.runner.where(launch)}) ended without finishing" \
                                   f"{before}{f' ({probe.detail})' if probe.detail else ''}; last lines of " \
                                   f"{job_dir / 'train.log'}:\n{_log_tail(job_dir / 'train.log')}"
                    write_status(job_dir, status)
        if launch is not None:
            await self.runner.collect_logs(job_dir, launch, final=status.status in ("succeeded", "failed", "cancelled"))
        if status.status == "failed" and status.error and "train.log" not in status.error:
            status.error += f"\nlast lines of {job_dir / 'train.log'}:\n{_log_tail(job_dir / 'train.log')}"
        if status.status == "succeeded" and not spec.full_finetune and self.max_lora_rank is not None:
            try:  # every adapter is checked against what the server can load before it is registered
                validate_adapter(status.artifact_path or job_dir / "adapter", max_lora_rank=self.max_lora_rank)
            except ServeError as e:
                status.status, status.error = "failed", f"the adapter cannot be served: {e}"
                write_status(job_dir, status)
        latest = waiting
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
