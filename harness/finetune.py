"""The finetuning stage of one iteration: every agent's generator and critic file is validated,
submitted as its own job (all 2N at once), followed to the end with a live status display, and
recorded in the registry as the next iteration's models.

Which models are trained (the paper's method and its ablations):
* multiagent FT: one generator and one critic per agent, each on its own data (2N jobs);
* `finetune.train_critics: false` (w/o critic): the N generators only; every critic stays the
  base model, recorded in the registry as "kept" with a note;
* `finetune.single_model: true` (single-agent FT, Majority FT, STaR): ONE job on every agent's
  examples pooled in one file; its model is registered as agent 0's generator and shared by
  every agent in every role it was trained for;
* with one debate round the critics never speak: generators only.

Idempotent: a model already registered as succeeded (or kept) is skipped, and the provider looks
each job up by its metadata before creating one, so a resumed run never starts a second job.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from harness.config import FinetuneConfig, RunConfig
from harness.ftdata import FtDataStats, pool_one_model
from harness.ftvalidate import validate_training_file
from harness.providers.base import FinetuneProvider, FinetuneRequest, JobState, JobStatus
from harness.registry import ModelEntry, Registry

log = logging.getLogger(__name__)
ROLES = ("generator", "critic")


def mean_agent_job_steps(stats: FtDataStats, roles: tuple[str, ...], ft: FinetuneConfig) -> int | None:
    """The mean optimizer steps of the per-agent jobs this data would give (each: epochs x
    ceil(examples / batch), batch counting every process and accumulation step of a local job),
    over the files with enough examples to train; None when no agent's file would train."""
    hp = ft.hyperparameters
    batch = hp.batch_size * ft.local.processes_per_job * ft.local.accumulation_steps(hp.batch_size)
    steps = [hp.n_epochs * math.ceil(f.examples / batch) for f in stats.files
             if f.role in roles and f.examples >= ft.min_examples]
    return max(1, round(sum(steps) / len(steps))) if steps else None


@dataclass
class FinetuneStage:
    cfg: RunConfig
    provider: FinetuneProvider
    registry: Registry
    registry_path: Path
    run_dir: Path
    console: Console
    # A failed job is retried on resume only while the next iteration has not debated yet:
    # after that, its debates were made with the fallback model and must stay consistent.
    retry_failed: bool = True
    max_steps: int | None = None  # the pooled job's cap (finetune.local.single_model_steps), set by run()

    def _save(self, entry: ModelEntry) -> None:
        self.registry.upsert(entry)
        self.registry.save(self.registry_path)

    def _parent(self, target: int, role: str, agent: int) -> str:
        if self.cfg.finetune.start_from == "base":
            return self.cfg.models.base
        return self.registry.model_for(target - 1, role, agent)

    async def run(self, stats: FtDataStats, data_dir: Path, target: int) -> list[ModelEntry]:
        """Train iteration `target`'s models from the data in `data_dir` (built at target-1)."""
        ft = self.cfg.finetune
        # With a single debate round the critics never speak: train generators only.
        roles = ROLES if self.cfg.debate.rounds > 1 and ft.train_critics else ("generator",)
        self.max_steps = None
        if ft.single_model:
            if ft.provider == "local" and ft.local.single_model_steps == "mean_agent_job":
                self.max_steps = mean_agent_job_steps(stats, roles, ft)
            stats = await asyncio.to_thread(pool_one_model, stats, data_dir, roles)
            jobs = [("generator", 0)]
        else:
            jobs = [(role, agent) for agent in range(stats.n_agents) for role in roles]
        states: dict[tuple[str, int], str] = {}
        table = lambda: self._table(target, jobs, states)  # noqa: E731
        with Live(table(), console=self.console, refresh_per_second=4, transient=False,
                  auto_refresh=self.console.is_terminal) as live:
            def show(role: str, agent: int, text: str) -> None:
                before = states.get((role, agent))
                if before == text:
                    return
                states[(role, agent)] = text
                live.update(table())
                # Without a terminal (CI, nohup) the live table cannot redraw: log status changes.
                if not self.console.is_terminal and (before or "").split(" ")[0] != text.split(" ")[0]:
                    self.console.print(f"iter {target} · {role} {agent}: {text}")

            # Submit every job first, inside the provider's batch (the local provider launches the
            # iteration's LoRA jobs together, as one resident process), then follow them all.
            async with self.provider.batch():
                submitted = await asyncio.gather(*(self._submit(stats, data_dir, target, role, agent, show)
                                                   for role, agent in jobs))
            entries = list(await asyncio.gather(*(self._follow(entry, state, show) for entry, state in submitted)))
        if ft.single_model:
            entries += self._share(entries[0], target, roles)
        if self.cfg.debate.rounds > 1 and not ft.train_critics:
            entries += self._keep_critics(target)
        return entries

    def _share(self, trained: ModelEntry, target: int, roles: tuple[str, ...]) -> list[ModelEntry]:
        """Single model: every (role, agent) the model was trained for uses the one model."""
        shared = []
        for role in roles:
            for agent in range(self.cfg.debate.agents):
                if (role, agent) == (trained.role, trained.agent):
                    continue
                copy = trained.model_copy(update={
                    "role": role, "agent": agent,
                    "note": "shares the one model trained on every agent's pooled data (finetune.single_model)"})
                self._save(copy)
                shared.append(copy)
        return shared

    def _keep_critics(self, target: int) -> list[ModelEntry]:
        """W/o critic: the critics are not finetuned; each keeps its model (the base model)."""
        kept = []
        for agent in range(self.cfg.debate.agents):
            parent = self._parent(target, "critic", agent)
            entry = ModelEntry(iteration=target, role="critic", agent=agent, provider=self.provider.name,
                               parent_model=parent, model_id=parent, status="kept",
                               note=f"kept {parent}: critics are not finetuned (finetune.train_critics: false)")
            self._save(entry)
            kept.append(entry)
        return kept

    async def _submit(self, stats: FtDataStats, data_dir: Path, target: int, role: str, agent: int,
                      show) -> tuple[ModelEntry, JobState | None]:
        """The job's registry entry and its submitted job's state; None when no job is needed (done
        in an earlier session, too few examples, invalid data: the entry says which)."""
        done = self.registry.get(target, role, agent)
        if done is not None and (done.status in ("succeeded", "kept") or not self.retry_failed):
            show(role, agent, f"{done.status} (earlier session): {done.model_id or done.error}")
            return done, None
        parent = self._parent(target, role, agent)
        info = stats.file(role, agent)
        path = data_dir / info.path
        ft = self.cfg.finetune
        entry = ModelEntry(iteration=target, role=role, agent=agent, provider=self.provider.name,
                           parent_model=parent, data_path=str(path.relative_to(self.run_dir)),
                           data_sha256=info.sha256, n_examples=info.examples)
        report = await asyncio.to_thread(validate_training_file, path, min_examples=ft.min_examples,
                                         max_example_tokens=ft.max_example_tokens)
        if report.too_few:
            entry.status, entry.model_id = "kept", parent
            entry.note = f"kept {parent}: {report.n_examples} examples < {ft.min_examples}"
            self._save(entry)
            show(role, agent, f"[yellow]kept previous model[/] ({report.n_examples} examples < {ft.min_examples})")
            return entry, None
        if not report.ok:
            entry.status, entry.error = "failed", report.summary()
            self._save(entry)
            show(role, agent, f"[red]invalid data[/]: {report.summary()}")
            return entry, None
        metadata = {"harness_run": self.registry.run, "iteration": str(target), "role": role,
                    "agent": str(agent), "data_sha256": info.sha256[:16]}
        suffix = ft.suffix or f"{self.cfg.name[:24]}-i{target}-{role[0]}{agent}"
        request = FinetuneRequest(training_file=path, base_model=parent, hyperparameters=ft.hyperparameters,
                                  metadata=metadata, suffix=suffix, seed=self.cfg.seed, max_steps=self.max_steps)
        if self.max_steps is not None:
            entry.note = f"capped at {self.max_steps} optimizer steps, the mean per-agent job's (single_model_steps)"
        show(role, agent, "submitting")
        state = await self.provider.submit(request)
        self._record(entry, state)
        return entry, state

    async def _follow(self, entry: ModelEntry, state: JobState | None, show) -> ModelEntry:
        """Wait for the submitted job to end, recording each state in the registry."""
        if state is None:
            return entry
        role, agent, ft = entry.role, entry.agent, self.cfg.finetune

        def on_update(s: JobState) -> None:
            self._record(entry, s)
            show(role, agent, f"{s.raw_status}" + (f" · {s.latest_event}" if s.latest_event else ""))

        state = await self.provider.wait(state.job_id, poll_interval_s=ft.poll_interval_s, on_update=on_update)
        self._record(entry, state)
        if state.status is JobStatus.SUCCEEDED:
            show(role, agent, f"[green]succeeded[/]: {state.model_id}")
        else:
            show(role, agent, f"[red]{state.raw_status}[/]: {state.error or 'no message from the provider'}")
        return entry

    def _record(self, entry: ModelEntry, state: JobState) -> None:
        entry.job_id, entry.file_id = state.job_id, state.file_id or entry.file_id
        entry.status = state.status.value if state.status is not JobStatus.UNKNOWN else "unknown"
        entry.trained_tokens = state.trained_tokens or entry.trained_tokens
        entry.error = state.error
        if state.status is JobStatus.SUCCEEDED:
            entry.model_id = state.model_id
            entry.finished_at = state.finished_at or time.time()
        elif state.status.terminal:
            entry.finished_at = state.finished_at or time.time()
        self._save(entry)

    def _table(self, target: int, jobs, states) -> Table:
        t = Table(title=f"iteration {target}: finetuning {len(jobs)} models ({self.provider.name})")
        t.add_column("role")
        t.add_column("agent", justify="right")
        t.add_column("status / latest event", overflow="fold")
        for role, agent in jobs:
            t.add_row(role, str(agent), states.get((role, agent), "waiting"))
        return t
