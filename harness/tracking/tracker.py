"""The one object the loop talks to: `Tracker.open` when the run starts, `log_iteration` after
each iteration, `close` at the end.

Logging never breaks or slows the run: the backend's calls (which may write files or go over
the network) run one at a time on a daemon thread of their own, the loop only queues them, and
any error there becomes a warning after which tracking stops for this session; the run
directory keeps every number either way. `close` waits at most `tracking.finish_timeout_s`.

The tracked run's id is kept in <run dir>/tracking.json (base.TrackingState) with what was
already sent, so a resumed run reopens the same tracked run and sends only what it has not.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from harness.config import RunConfig
from harness.fileio import write_model
from harness.identity import flat
from harness.records import IterationMetrics
from harness.registry import ModelEntry
from harness.tracking.backends import make_backend
from harness.tracking.base import STATE_FILE, Backend, TrackedRun, TrackingState
from harness.tracking.collect import iteration_end, iteration_numbers, loss_key, metrics_table, read_stages

log = logging.getLogger(__name__)

LOSS_TIMEOUT_S = 30.0  # reading one hosted job's events for its loss curve


def load_state(run_dir: Path) -> TrackingState:
    path = Path(run_dir) / STATE_FILE
    try:
        return TrackingState.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return TrackingState()
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s): the run is tracked as a new tracked run", path, str(e).splitlines()[0])
        return TrackingState()


class Tracker:
    def __init__(self, cfg: RunConfig, run_dir: Path, backend: Backend | None,
                 say: Callable[[str], None] = print):
        self.cfg = cfg
        self.say = say
        self.settings = cfg.tracking
        self.run_dir = Path(run_dir)
        self.backend = backend
        self.state = load_state(run_dir)
        self.tracked: TrackedRun | None = None  # set by the worker once started
        previous = self.state.runs.get(self.settings.backend)
        # What the loop has queued (the worker's record of what was sent starts the same).
        self.queued_iterations = set(previous.iterations if previous else ())
        self.queued_jobs = set(previous.jobs if previous else ())
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._broken = False
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, cfg: RunConfig, run_dir: Path, say: Callable[[str], None] = print) -> "Tracker":
        """A tracker for the run (one that does nothing with `tracking.backend: none`). Raises
        ConfigError, before anything runs, when the backend's package is not installed."""
        if cfg.tracking.backend == "none":
            return cls(cfg, run_dir, None, say)
        tracker = cls(cfg, run_dir, make_backend(cfg.tracking), say)
        tracker._thread = threading.Thread(target=tracker._work, name="harness-tracking", daemon=True)
        tracker._thread.start()
        tracker._submit(tracker._start)
        return tracker

    @property
    def active(self) -> bool:
        return self.backend is not None and not self._broken

    # ------------------------------------------------------------------ what the loop calls

    async def after_iteration(self, run: Any, iterations: list[IterationMetrics]) -> None:
        """The loop's hook: `run` is harness.loop.Run (its client, registry and provider)."""
        if not self.active:
            return
        k = iterations[-1].iteration
        await self.log_iteration(iterations, usage=run.client.totals().model_dump(),
                                 entries=[e for e in run.registry.entries if e.iteration == k + 1],
                                 loss_curve=run.provider.loss_curve if run.provider is not None else None)

    async def log_iteration(self, iterations: list[IterationMetrics], *, usage: dict[str, Any],
                            entries: Iterable[ModelEntry] = (), loss_curve: Callable | None = None) -> None:
        """Iteration `iterations[-1]`: its numbers at step k and the metrics table so far; then
        the loss curve of each finetuning job in `entries` (read with the provider's
        `loss_curve`), unless an earlier session sent them."""
        if not self.active:
            return
        metrics = iterations[-1]
        k = metrics.iteration
        if k not in self.queued_iterations:
            numbers = iteration_numbers(self.run_dir, metrics, usage)
            at = iteration_end(read_stages(self.run_dir / "stages.jsonl"), k)
            columns, rows = metrics_table(self.cfg.name, iterations)
            self.queued_iterations.add(k)
            self._submit(lambda: self._iteration(k, numbers, columns, rows, at))
        if not self.settings.loss_curves or loss_curve is None:
            return
        todo = {e.job_id: e for e in entries
                if e.job_id and e.job_id not in self.queued_jobs and e.status in ("succeeded", "failed", "cancelled")}
        self.queued_jobs |= todo.keys()
        # All at once: a hosted provider reads each job's events over the network.
        curves = await asyncio.gather(*(asyncio.wait_for(loss_curve(job), LOSS_TIMEOUT_S) for job in todo),
                                      return_exceptions=True)
        for (job, entry), curve in zip(todo.items(), curves):
            if isinstance(curve, BaseException):
                if not isinstance(curve, Exception):
                    raise curve  # a cancellation or an interrupt is not the tracker's to swallow
                log.warning("tracking: the loss curve of job %s could not be read (%s)", job, curve)
                continue
            self._submit(lambda e=entry, c=curve: self._curve(e, c))

    def close(self, *, ok: bool) -> None:
        """Send the report and summary (when the run finished), close the tracked run and wait
        for the queue to drain, at most `tracking.finish_timeout_s`."""
        if self._thread is None:
            return
        if ok and self.settings.artifacts:
            self._submit(self._artifacts)
        self._submit(lambda: self._finish(ok))
        self._queue.put(None)
        self._thread.join(self.settings.finish_timeout_s)
        if self._thread.is_alive():
            log.warning("tracking: the %s tracker had not taken everything after %.0fs (tracking.finish_timeout_s); "
                        "the rest is not sent (the run directory holds it all)", self.settings.backend,
                        self.settings.finish_timeout_s)
        elif self.tracked is not None:
            self.say(self.where())
        self._thread = None

    def where(self) -> str:
        t = self.tracked
        assert t is not None
        return (f"tracked with {self.settings.backend}: project {t.project}, run {t.run_name} ({t.run_id})"
                + (f" in {t.where}" if t.where else ""))

    # ------------------------------------------------------------------ the worker thread

    def _submit(self, job: Callable[[], None]) -> None:
        if self.active:
            self._queue.put(job)

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._broken:
                continue
            try:
                job()
            except Exception as e:  # noqa: BLE001 - the tracker's trouble must never stop the run
                # Without a started run nothing else can be sent; after a failed send the next
                # ones may still go through.
                self._broken = self.tracked is None
                log.warning("tracking: the %s tracker failed (%s: %s); %s (every number is in the run directory; "
                            "a resumed run sends what is missing)", self.settings.backend, type(e).__name__,
                            (str(e).splitlines() or [""])[0],
                            "the run goes on without it" if self._broken else "that part was not sent")

    def _save(self) -> None:
        assert self.tracked is not None
        self.state.runs[self.settings.backend] = self.tracked
        write_model(self.run_dir / STATE_FILE, self.state)

    def _start(self) -> None:
        assert self.backend is not None
        previous = self.state.runs.get(self.settings.backend)
        config = flat(self.cfg.model_dump(mode="json"))
        tags = {"harness.method": self.cfg.name, "harness.task": self.cfg.task.name,
                "harness.endpoint": self.cfg.endpoint.kind, "harness.run_dir": self.run_dir.name}
        name = self.settings.run_name or self.run_dir.resolve().name
        started = self.backend.start(previous=previous, run_name=name, config=config, tags=tags)
        if previous is not None and started.run_id == previous.run_id:
            started.iterations, started.jobs = previous.iterations, previous.jobs
        self.tracked = started
        self._save()
        log.info("%s", self.where())

    def _iteration(self, k: int, numbers: dict[str, float], columns: list[str], rows: list[list[Any]],
                   at: float | None) -> None:
        assert self.backend is not None and self.tracked is not None
        self.backend.log_metrics(numbers, step=k, step_key="iteration", at=at)
        self.backend.log_table("metrics_table", columns, rows, step=k)
        self.tracked.iterations = sorted({*self.tracked.iterations, k})
        self._save()

    def _curve(self, entry: ModelEntry, curve: list) -> None:
        assert self.backend is not None and self.tracked is not None and entry.job_id is not None
        prefix = loss_key(entry.iteration, entry.role, entry.agent)
        self.backend.log_series(f"{prefix}/loss", [(p.step, p.loss) for p in curve], step_key=f"{prefix}/step",
                                at=entry.finished_at or entry.created_at)
        self.tracked.jobs = sorted({*self.tracked.jobs, entry.job_id})
        self._save()

    def _artifacts(self) -> None:
        assert self.backend is not None
        for name in ("config.yaml", "summary.json", "registry.json"):
            if (self.run_dir / name).is_file():
                self.backend.log_artifact(self.run_dir / name, "run")
        from harness.report import build_report

        # The report goes to a temporary folder: the run directory stays as the loop wrote it.
        with tempfile.TemporaryDirectory(prefix="harness-report-") as tmp:
            out = Path(tmp) / "report"
            build_report([self.run_dir], out, compute_missing=False)
            self.backend.log_artifact(out, "report")

    def _finish(self, ok: bool) -> None:
        assert self.backend is not None
        self.backend.finish(ok=ok)
