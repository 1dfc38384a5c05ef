"""The loop's engine: the stages of one run directory (`Run`) and the iterations that drive them.

`run_loop` is what `python -m harness.loop` runs after reading its arguments (harness.loop, the
command line, re-exports it): for each iteration, the test debate and its metrics, then unless it
is the last, the train debate, each agent's data and the finetuning of the next society.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import RunConfig
from harness.debate import Debater, DebateSettings, Society, finished_records, problems_in_flight, run_debates
from harness.diversity import DiversityMetrics, compute_diversity, sampling_note
from harness.diversity.local_scoring import likelihood_scorer
from harness.endpoints import open_endpoint
from harness.errors import ConfigError
from harness.evaluate import split_metrics
from harness.fileio import JsonlAppender, write_model
from harness.finetune import FinetuneStage
from harness.ftdata import FtDataStats, build_ftdata, build_star_ftdata
from harness.identity import establish
from harness.llm import LLMClient
from harness.llm.batch import debate_client
from harness.prompts import Prompts
from harness.providers.base import FinetuneProvider
from harness.providers.factory import make_provider
from harness.records import DebateRecord, IterationMetrics, Problem, RunSummary, StageTiming
from harness.registry import Registry
from harness.serve_pool import ModelPool, model_pool
from harness.star import rationalize
from harness.tasks import get_task, load_split
from harness.tracking.tracker import Tracker

log = logging.getLogger("harness")


class Run:
    """One run directory and everything the stages share."""

    def __init__(self, cfg: RunConfig, run_dir: Path, console: Console, client: LLMClient, urls: list[str],
                 provider: FinetuneProvider | None, registry: Registry, pool: "ModelPool | None" = None):
        self.cfg = cfg
        self.dir = run_dir
        self.console = console
        self.client = client
        self.urls = urls  # every server of the endpoint (adapters are loaded on each)
        self.provider = provider  # None: nothing to train and nothing to load
        self.task = get_task(cfg.task.name)
        self.prompts = Prompts(cfg.task.name, cfg.task.prompts_dir, cfg.task.prompt_set)
        self.simulated = cfg.endpoint.kind == "simulator"
        self.warnings: list[str] = []
        self.registry_path = run_dir / "registry.json"
        # Its run id tags every finetuning job; harness.identity recovers it (and the registry)
        # before anything is created, so a resumed run never starts a job twice.
        self.registry = registry
        self.pool = pool  # fully finetuned agents: a vLLM server per model (harness.serve_pool)

    def iter_dir(self, k: int) -> Path:
        return self.dir / f"iter-{k}"

    @contextlib.contextmanager
    def stage(self, k: int, stage: str, split: str | None = None):
        """Times one stage into stages.jsonl (wall time per stage, per session)."""
        started, t0 = time.time(), time.monotonic()
        yield
        with JsonlAppender(self.dir / "stages.jsonl") as out:
            out.append(StageTiming(iteration=k, stage=stage, split=split, started_at=started,
                                   seconds=round(time.monotonic() - t0, 3)))

    def society(self, k: int, agents: int) -> Society:
        generators, critics = self.registry.models_for(k, agents)
        return Society(generators=generators, critics=critics, summarizer=self.cfg.summarizer)

    async def load_models(self, k: int, society: Society) -> None:
        """Models a server must load before it can answer for them (vLLM LoRA adapters), on
        every server; loading is idempotent, and this run's stale adapters are unloaded."""
        if self.provider is None or self.cfg.endpoint.kind != "vllm" or self.pool is not None:
            return
        adapters = self.provider.artifacts([*society.generators, *society.critics])
        from harness.serve import load_adapters

        with self.stage(k, "load_adapters"):
            for url in self.urls:
                await load_adapters(url, adapters, stale_prefix=self.registry.run + "-", api_key=self.client.api_key)
            if adapters and self.cfg.serve.probe.enabled:  # a server can accept an adapter and not apply it
                from harness.probes import PROBES_FILE, probe_adapters

                await probe_adapters(self.client, self.urls, self.cfg.models.base, sorted(adapters),
                                     settings=self.cfg.serve.probe, iteration=k,
                                     out_path=self.iter_dir(k) / PROBES_FILE)

    async def serve_models(self, k: int, split: str, society: Society, rounds: int, problems: list[Problem]) -> None:
        """Fully finetuned agents only: the servers of the models this debate needs are up (those
        of models no longer needed stopped first), and the client routes each model to its own.
        A resumed run starts none for a debate it finished (and, on the test split, whose
        diversity.json is written): minutes per server on a GPU, for nothing."""
        if self.pool is None:
            return
        done = finished_records(self.iter_dir(k) / f"debate-{split}.jsonl")
        if all(p.id in done for p in problems) and (split != "test" or (self.iter_dir(k) / "diversity.json").exists()):
            return
        names = [*society.generators, *society.critics, society.summarizer, self.cfg.models.base]
        artifacts = self.provider.artifacts(names) if self.provider is not None else {}
        models = self.pool.models_for(society.generators, society.critics, society.summarizer, rounds=rounds,
                                      split=split, artifacts=artifacts)
        with self.stage(k, "serve_models", split):
            await self.pool.serve(models, self.client)

    async def debate(self, k: int, split: str, problems: list[Problem], society: Society,
                     rounds: int) -> list[DebateRecord]:
        await self.serve_models(k, split, society, rounds, problems)
        await self.load_models(k, society)
        settings = DebateSettings(rounds=rounds, mode=self.cfg.debate.mode,
                                  grading_timeout_s=self.cfg.grading.timeout_s, seed=self.cfg.seed)
        # With endpoint.batch every problem debates at once, so each round goes out as one batch.
        in_flight = len(problems) if self.cfg.endpoint.batch else problems_in_flight(self.cfg.endpoint.concurrency,
                                                                                     society.n_agents)
        async with debate_client(self.cfg.endpoint, self.client, self.dir, self.registry.run, self.urls[0]) as chat:
            debater = Debater(chat, society, self.prompts, self.task.extract, settings, iteration=k, split=split)
            records = await self._debate_split(k, split, problems, debater, in_flight)
        if not self.console.is_terminal:
            self.console.print(f"iter {k} · debate {split}: {len(records)} problems")
        refused = [e for r in records for t in r.agents for e in t.errors if e is not None]
        if refused:
            self.warnings.append(
                f"iteration {k}, {split}: the server refused {len(refused)} replies for length (they count as "
                f"unparseable); use a model with a longer context (vLLM: serve.max_model_len) or fewer "
                f"debate rounds. The server said: …{refused[0][-150:]}")
        return records

    async def _debate_split(self, k: int, split: str, problems: list[Problem], debater: Debater,
                            in_flight: int) -> list[DebateRecord]:
        with Progress(TextColumn(f"iter {k} · debate {split}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("acc {task.fields[acc]}"), TimeElapsedColumn(),
                      console=self.console, transient=False, disable=not self.console.is_terminal) as bar:
            task_id = bar.add_task("debate", total=len(problems), acc="-")
            hits = [0, 0]

            def on_done(record: DebateRecord) -> None:
                hits[0] += record.correct
                hits[1] += 1
                bar.update(task_id, advance=1, acc=f"{100 * hits[0] / hits[1]:.1f}%")

            with self.stage(k, "debate", split):
                return await run_debates(debater, problems, self.iter_dir(k) / f"debate-{split}.jsonl", on_done,
                                         max_in_flight=in_flight)

    async def star_data(self, k: int, records: list[DebateRecord], data_dir: Path) -> FtDataStats:
        """STaR only: rationalize the wrong answers with a gold hint (harness.star), then select
        the gold-correct answers and rationalizations. The one stage that reads gold for data."""
        cfg = self.cfg
        rationalized = await rationalize(
            self.client, self.prompts, self.task.extract, records, self.iter_dir(k) / "star-rationalize.jsonl",
            iteration=k, grading_timeout_s=cfg.grading.timeout_s,
            max_in_flight=problems_in_flight(cfg.endpoint.concurrency, 1))
        return await asyncio.to_thread(build_star_ftdata, records, rationalized, n_agents=cfg.debate.agents,
                                       cfg=cfg.finetune, out_dir=data_dir, seed=cfg.seed,
                                       timeout_s=cfg.grading.timeout_s)

    async def diversity(self, k: int, records: list[DebateRecord]) -> None:
        """iter-<k>/diversity.json for the test split (harness.diversity defines each measure);
        a measure that cannot be computed becomes a note, never a failed run."""
        path = self.iter_dir(k) / "diversity.json"
        if path.exists():
            try:
                DiversityMetrics.model_validate_json(path.read_bytes())
                return
            except ValueError as e:  # damaged (a disk error, an edit): computed again, as if missing
                log.warning("%s is damaged (%s); computing it again", path, str(e).splitlines()[0])
        cfg = self.cfg
        on, scorer, why = likelihood_scorer(cfg, self.provider, records)
        try:
            # With endpoint.batch an endpoint embedding model's calls go through the Batch API too.
            with self.stage(k, "diversity", "test"):
                async with debate_client(cfg.endpoint, self.client, self.dir, self.registry.run,
                                         self.urls[0]) as calls:
                    div = await compute_diversity(
                        records, iteration=k, split="test", client=calls,
                        embedding_model=cfg.analysis.resolve_embedding_model(cfg.endpoint.kind),
                        logprobs=on, base_model=cfg.models.base, scorer=scorer, logprobs_note=why,
                        logprob_max_problems=cfg.analysis.likelihood_max_problems,
                        logprob_concurrency=cfg.analysis.logprob_concurrency,
                        sampling_note=sampling_note(cfg.sampling))
        finally:
            if scorer is not None:
                await scorer.aclose()
        write_model(path, div)

    def write_summary(self, iterations: list[IterationMetrics], finished: bool) -> RunSummary:
        summary = RunSummary(run=self.cfg.name, simulated=self.simulated, iterations=iterations,
                             usage=self.client.totals().model_dump(), warnings=self.warnings, finished=finished)
        if finished or not self._holds_more(iterations):
            write_model(self.dir / "summary.json", summary)
        return summary

    def _holds_more(self, iterations: list[IterationMetrics]) -> bool:
        """Whether summary.json is a finished summary with at least these iterations: a resumed
        session's partial summary never replaces it (it stays until this session finishes)."""
        try:
            old = RunSummary.model_validate_json((self.dir / "summary.json").read_bytes())
        except (OSError, ValueError):
            return False
        return old.finished and len(old.iterations) >= len(iterations)


def _check_splits(cfg: RunConfig, train: list[Problem], test: list[Problem]) -> None:
    if not test:
        raise ConfigError("task.n_test is 0: there is nothing to evaluate; set task.n_test to the number of test "
                          "problems, e.g. --set task.n_test=100")
    if cfg.finetune.iterations > 0 and not train:
        raise ConfigError(f"task.n_train is 0 but finetune.iterations is {cfg.finetune.iterations}: there is nothing "
                          f"to finetune on; set task.n_train (e.g. --set task.n_train=100) or finetune.iterations=0")


async def run_loop(cfg: RunConfig, run_dir: Path, console: Console,
                   splits: tuple[list[Problem], list[Problem]] | None = None) -> RunSummary:
    """`splits`: (train, test) problems in place of the task's seeded splits; the real-model
    benchmark's --tune debates its DEV problems this way, as the "test" split of a tuning run."""
    train, test = splits or (load_split(cfg.task, "train") if cfg.finetune.iterations > 0 else [],
                             load_split(cfg.task, "test"))
    _check_splits(cfg, train, test)
    iterations: list[IterationMetrics] = []
    tracker = Tracker.open(cfg, run_dir, say=console.print)  # tracking.backend; a missing extra stops here
    finished = False
    try:
        summary = await _run_iterations(cfg, run_dir, console, train, test, iterations, tracker)
        finished = True
        return summary
    finally:
        tracker.close(ok=finished)


async def _run_iterations(cfg: RunConfig, run_dir: Path, console: Console, train: list[Problem], test: list[Problem],
                          iterations: list[IterationMetrics], tracker: Tracker) -> RunSummary:
    pool = model_pool(cfg, run_dir)  # None unless fully finetuned agents are served by vLLM
    async with (pool.endpoint() if pool is not None else open_endpoint(cfg, run_dir, [*train, *test])) as (urls, api_key):
        async with LLMClient(base_url=urls, api_key=api_key, run_dir=run_dir,
                             endpoint=cfg.endpoint, sampling=cfg.sampling, budget_usd=cfg.budget.max_cost_usd,
                             prices=cfg.prices, seed=cfg.seed) as client:
            # A local provider is needed even with nothing left to train: it knows the adapters
            # that a resumed run's society must load.
            needs_provider = cfg.finetune.iterations > 0 or cfg.finetune.provider in ("local", "tinker")
            provider = make_provider(cfg, urls[0], run_dir) if needs_provider else None
            for name, price in (provider.model_prices() if provider is not None else {}).items():
                client.prices.setdefault(name, price)  # e.g. Azure deployment names; the config's win
            try:
                # Before anything is created: the run's id (which tags its jobs) and its registry,
                # recovered from wherever they survive, the provider's own job list included.
                _, registry, notes = await establish(cfg, run_dir, provider)
                run = Run(cfg, run_dir, console, client, urls, provider, registry, pool)
                run.warnings.extend(client.notes)  # e.g. calls an earlier session left in flight at a crash
                for note in notes:
                    console.print(f"[bold yellow]note:[/] {note}")
                for k in range(cfg.finetune.iterations + 1):
                    iterations.append(await run_iteration(run, k, train, test))
                    run.write_summary(iterations, finished=False)
                    await tracker.after_iteration(run, iterations)
                if provider is not None:  # e.g. Azure deployments, billed per hour while they exist
                    run.warnings.extend(await provider.billing_notes(registry.run))
            finally:
                if provider is not None:
                    await provider.close()
            return run.write_summary(iterations, finished=True)


async def run_iteration(run: Run, k: int, train: list[Problem], test: list[Problem]) -> IterationMetrics:
    """Evaluate iteration k's society on the test split; unless it is the last iteration, debate the
    train split, build each agent's data and finetune iteration k+1's society."""
    cfg = run.cfg
    # The test split is answered by the evaluation society (by default the debate's own).
    test_society = run.society(k, cfg.test_agents)
    test_records = await run.debate(k, "test", test, test_society, cfg.test_rounds)
    splits = {"test": split_metrics(test_records, iteration=k, split="test", simulated=run.simulated)}
    metrics = IterationMetrics(iteration=k, splits=splits, generators=list(test_society.generators),
                               critics=list(test_society.critics))
    write_model(run.iter_dir(k) / "metrics.json", metrics)  # test results on disk before training starts
    await run.diversity(k, test_records)
    if k < cfg.finetune.iterations:
        assert run.provider is not None
        train_records = await run.debate(k, "train", train, run.society(k, cfg.debate.agents), cfg.debate.rounds)
        metrics.splits["train"] = split_metrics(train_records, iteration=k, split="train", simulated=run.simulated)
        write_model(run.iter_dir(k) / "metrics.json", metrics)
        data_dir = run.iter_dir(k) / "ftdata"
        with run.stage(k, "ftdata"):
            if cfg.finetune.selection == "star":
                stats = await run.star_data(k, train_records, data_dir)
            else:
                stats = await asyncio.to_thread(build_ftdata, train_records, n_agents=cfg.debate.agents,
                                                cfg=cfg.finetune, out_dir=data_dir, seed=cfg.seed,
                                                timeout_s=cfg.grading.timeout_s)
        if run.pool is not None:  # training needs the GPUs the agents' servers hold
            run.pool.stop_all()
        next_started = any(run.iter_dir(k + 1).glob("debate-*.jsonl"))
        stage = FinetuneStage(cfg, run.provider, run.registry, run.registry_path, run.dir, run.console,
                              retry_failed=not next_started)
        with run.stage(k, "finetune"):
            entries = await stage.run(stats, data_dir, target=k + 1)
        for e in entries:
            if e.status not in ("succeeded", "kept"):
                run.warnings.append(
                    f"iteration {e.iteration}: the {e.role} job of agent {e.agent} {e.status} "
                    f"({e.error or 'no message'}); that agent kept {run.registry.model_for(e.iteration, e.role, e.agent)}")
    return metrics
