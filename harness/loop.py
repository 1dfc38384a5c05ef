"""`python -m harness.loop`: the whole multiagent-finetuning loop, resumable at every stage.

For each iteration k = 0..L: debate the test split with iteration k's society and write its
metrics; if k < L, debate the train split, build each agent's generator/critic data, finetune
all 2N models (one job each, concurrently) and register them as iteration k+1's society.

With no arguments it runs the `demo` preset on the built-in simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import re
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.config import RunConfig, load_config
from harness.debate import Debater, DebateSettings, Society, problems_in_flight, run_debates
from harness.diversity import DiversityMetrics, compute_diversity, sampling_note
from harness.endpoints import open_endpoint
from harness.errors import BudgetExceeded, ConfigError, DataError, HarnessError
from harness.evaluate import print_results, split_metrics
from harness.fileio import CorruptRecordError, DirLock, JsonlAppender, remove_stale_temps, write_model
from harness.finetune import FinetuneStage
from harness.ftdata import FtDataStats, build_ftdata, build_star_ftdata
from harness.identity import (RESUMABLE_FIELDS, establish, finished_work, flat, frozen_changes, header_run_id,
                              load_identity, write_config)
from harness.llm import LLMClient
from harness.plan import estimate_plan, plan_table
from harness.prompts import Prompts
from harness.providers.base import FinetuneProvider
from harness.records import DebateRecord, IterationMetrics, Problem, RunSummary, StageTiming
from harness.registry import Registry
from harness.star import rationalize
from harness.tasks import get_task, load_split

log = logging.getLogger("harness")

EXIT_BUDGET = 3
__all__ = ["RESUMABLE_FIELDS", "main", "run_loop"]  # RESUMABLE_FIELDS: see harness.identity


class Run:
    """One run directory and everything the stages share."""

    def __init__(self, cfg: RunConfig, run_dir: Path, console: Console, client: LLMClient, urls: list[str],
                 provider: FinetuneProvider | None, registry: Registry):
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
        if self.provider is None or self.cfg.endpoint.kind != "vllm":
            return
        adapters = self.provider.artifacts([*society.generators, *society.critics])
        from harness.serve import load_adapters

        with self.stage(k, "load_adapters"):
            for url in self.urls:
                await load_adapters(url, adapters, stale_prefix=self.registry.run + "-")

    async def debate(self, k: int, split: str, problems: list[Problem], society: Society,
                     rounds: int) -> list[DebateRecord]:
        await self.load_models(k, society)
        settings = DebateSettings(rounds=rounds, mode=self.cfg.debate.mode,
                                  grading_timeout_s=self.cfg.grading.timeout_s, seed=self.cfg.seed)
        debater = Debater(self.client, society, self.prompts, self.task.extract, settings, iteration=k, split=split)
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
                records = await run_debates(debater, problems, self.iter_dir(k) / f"debate-{split}.jsonl", on_done,
                                            max_in_flight=problems_in_flight(self.cfg.endpoint.concurrency,
                                                                             society.n_agents))
        if not self.console.is_terminal:
            self.console.print(f"iter {k} · debate {split}: {len(records)} problems")
        refused = [e for r in records for t in r.agents for e in t.errors if e is not None]
        if refused:
            self.warnings.append(
                f"iteration {k}, {split}: the server refused {len(refused)} replies for length (they count as "
                f"unparseable); use a model with a longer context (vLLM: serve.max_model_len) or fewer "
                f"debate rounds. The server said: …{refused[0][-150:]}")
        return records

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
        with self.stage(k, "diversity", "test"):
            div = await compute_diversity(
                records, iteration=k, split="test", client=self.client,
                embedding_model=cfg.analysis.resolve_embedding_model(cfg.endpoint.kind),
                logprobs=cfg.endpoint.kind == "vllm" and cfg.analysis.likelihood, base_model=cfg.models.base,
                logprob_max_problems=cfg.analysis.likelihood_max_problems,
                logprob_concurrency=cfg.analysis.logprob_concurrency, sampling_note=sampling_note(cfg.sampling))
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


def make_provider(cfg: RunConfig, base_url: str, run_dir: Path) -> FinetuneProvider:
    if cfg.finetune.provider == "local":
        from harness.providers.local import LocalLoraProvider

        return LocalLoraProvider.from_config(cfg, run_dir)
    if cfg.finetune.provider == "tinker":
        from harness.providers.tinker_ft import TinkerProvider

        return TinkerProvider.from_config(cfg, run_dir)
    from harness.providers.openai_ft import OpenAIFinetuneProvider

    return OpenAIFinetuneProvider(base_url, cfg.endpoint.api_key(), max_retries=cfg.endpoint.max_retries,
                                  poll_interval_s=cfg.finetune.poll_interval_s,
                                  paused_timeout_s=cfg.finetune.paused_timeout_s)


def _check_splits(cfg: RunConfig, train: list[Problem], test: list[Problem]) -> None:
    if not test:
        raise ConfigError("task.n_test is 0: there is nothing to evaluate; set task.n_test to the number of test "
                          "problems, e.g. --set task.n_test=100")
    if cfg.finetune.iterations > 0 and not train:
        raise ConfigError(f"task.n_train is 0 but finetune.iterations is {cfg.finetune.iterations}: there is nothing "
                          f"to finetune on; set task.n_train (e.g. --set task.n_train=100) or finetune.iterations=0")


async def run_loop(cfg: RunConfig, run_dir: Path, console: Console) -> RunSummary:
    train = load_split(cfg.task, "train") if cfg.finetune.iterations > 0 else []
    test = load_split(cfg.task, "test")
    _check_splits(cfg, train, test)
    iterations: list[IterationMetrics] = []
    async with open_endpoint(cfg, run_dir, [*train, *test]) as urls:
        async with LLMClient(base_url=urls, api_key=cfg.endpoint.api_key(), run_dir=run_dir,
                             endpoint=cfg.endpoint, sampling=cfg.sampling, budget_usd=cfg.budget.max_cost_usd,
                             prices=cfg.prices, seed=cfg.seed) as client:
            # A local provider is needed even with nothing left to train: it knows the adapters
            # that a resumed run's society must load.
            needs_provider = cfg.finetune.iterations > 0 or cfg.finetune.provider in ("local", "tinker")
            provider = make_provider(cfg, urls[0], run_dir) if needs_provider else None
            try:
                # Before anything is created: the run's id (which tags its jobs) and its registry,
                # recovered from wherever they survive, the provider's own job list included.
                _, registry, notes = await establish(cfg, run_dir, provider)
                run = Run(cfg, run_dir, console, client, urls, provider, registry)
                run.warnings.extend(client.notes)  # e.g. calls an earlier session left in flight at a crash
                for note in notes:
                    console.print(f"[bold yellow]note:[/] {note}")
                for k in range(cfg.finetune.iterations + 1):
                    iterations.append(await run_iteration(run, k, train, test))
                    run.write_summary(iterations, finished=False)
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
        splits["train"] = split_metrics(train_records, iteration=k, split="train", simulated=run.simulated)
        write_model(run.iter_dir(k) / "metrics.json", metrics)
        data_dir = run.iter_dir(k) / "ftdata"
        with run.stage(k, "ftdata"):
            if cfg.finetune.selection == "star":
                stats = await run.star_data(k, train_records, data_dir)
            else:
                stats = await asyncio.to_thread(build_ftdata, train_records, n_agents=cfg.debate.agents,
                                                cfg=cfg.finetune, out_dir=data_dir, seed=cfg.seed,
                                                timeout_s=cfg.grading.timeout_s)
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


def dry_run(cfg: RunConfig, console: Console) -> None:
    train = load_split(cfg.task, "train") if cfg.finetune.iterations > 0 else []
    test = load_split(cfg.task, "test")
    console.print(plan_table(estimate_plan(cfg, train, test), simulated=cfg.endpoint.kind == "simulator"))
    console.print("nothing was called; run again without --dry-run to start")


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="a YAML file or a preset name (default: demo)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set debate.agents=5 (repeatable)")
    p.add_argument("--run-dir", type=Path, help="where to write the run (default: runs/<name>-<timestamp>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue a stopped run: finished work and paid calls are not repeated")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan with estimated calls, tokens and cost per stage; call nothing")
    p.add_argument("-v", "--verbose", action="store_true", help="log diagnostics")
    return p


def _show(value: object) -> str:
    return "(not set)" if value is None else repr(value) if isinstance(value, str) else str(value)


def _resume_config(run_dir: Path, overrides: list[str]) -> RunConfig:
    """The resumed run's config: config.yaml with the `--set` overrides, refused where it would
    contradict finished work. The saved values come from run.json (the settings the run started
    with), so a hand edit of config.yaml is caught as surely as a --set; while the run has
    finished nothing, every setting may change (the fix of a bad path or model name)."""
    saved = run_dir / "config.yaml"
    identity = load_identity(run_dir)
    restore = f"; restore the settings the run started with: python -m harness.repair {run_dir}" if identity else ""
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir}: no such directory")
    if not saved.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml there{restore or '; is this a run directory?'}")
    try:
        before = flat(load_config(str(saved)).model_dump(mode="json"))
    except ConfigError as e:
        raise ConfigError(f"--resume {run_dir}: {e}{restore}") from None
    cfg = load_config(str(saved), overrides)
    done = finished_work(run_dir)
    if not done:
        return cfg
    after = flat(cfg.model_dump(mode="json"))
    # Compared by value: restating a saved value (as `harness.compare` does) is fine.
    by_set = {k for k in before.keys() | after.keys()
              if before.get(k) != after.get(k) and not k.startswith(RESUMABLE_FIELDS)}
    changes = {k: (before.get(k), after.get(k)) for k in by_set}
    if identity is not None:  # the values the run started with are the reference
        changes = {k: v for k, v in changes.items() if k not in identity.frozen}
        changes.update({k: (old, new) for k, old, new in frozen_changes(identity.frozen, cfg)})
    if not changes:
        return cfg
    lines = [f"  {k}: {_show(old)} when the run started, {_show(new)} now "
             f"({'--set' if k in by_set else 'config.yaml was edited'})" for k, (old, new) in sorted(changes.items())]
    raise ConfigError(
        f"--resume {run_dir}: {', '.join(sorted(changes))} cannot change in a run that has started "
        f"({done[0]}{' and more' if len(done) > 1 else ''} were made with the saved value):\n" + "\n".join(lines) + "\n"
        f"Put the saved value back (drop the --set, or undo the edit of {saved}), or start a new run with the new "
        f"settings: python -m harness.loop --config {saved} --run-dir <new folder>. "
        f"On resume --set may change: {', '.join(RESUMABLE_FIELDS)}")


def resolve_run(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    if args.resume is not None:
        if args.config:
            raise ConfigError("--resume uses the run's saved config.yaml; drop --config (use --set to change a field)")
        return _resume_config(args.resume, args.overrides), args.resume
    cfg = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}"
    if (run_dir / "config.yaml").exists():
        done = finished_work(run_dir)
        if done:
            raise ConfigError(f"{run_dir} already holds a run ({done[0]}); continue it with --resume {run_dir}, "
                              f"or pick another --run-dir")
        log.info("%s holds a run that finished nothing: reusing the folder", run_dir)
    return cfg, run_dir


_FIELD_RE = re.compile(r"\b[a-z_]+(?:\.[a-z_]+)+\b")


def _after_error(run_dir: Path | None, error: HarnessError) -> str | None:
    """What to type after an error, from what the run directory holds: the repair command for a
    damaged record; --resume when work is finished; when nothing is, --resume with the field to
    fix (every setting may still change)."""
    if run_dir is None or not (run_dir / "config.yaml").exists():
        return None
    if isinstance(error, CorruptRecordError):
        return (f"keep every whole record and set the damaged line aside: python -m harness.repair {run_dir}\n"
                f"then continue: python -m harness.loop --resume {run_dir}")
    if finished_work(run_dir):
        return f"finished work is saved; after fixing the cause: python -m harness.loop --resume {run_dir}"
    known = flat(RunConfig().model_dump(mode="json"))
    fields = list(dict.fromkeys(f for f in _FIELD_RE.findall(str(error)) if f in known))
    fix = f" --set {fields[0]}=<fixed value>" if fields else " --set <field>=<fixed value>"
    others = f" (or {', '.join(fields[1:])})" if len(fields) > 1 else ""
    return (f"nothing was finished in {run_dir}, so any setting may still change; fix it and run: "
            f"python -m harness.loop --resume {run_dir}{fix}{others}")


def _terminate(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # `kill PID` (SIGTERM) stops the run as Ctrl-C does: the vLLM server the run started is
        # stopped and the run directory unlocked, instead of a server left running on its own.
        signal.signal(signal.SIGTERM, _terminate)
    console = Console()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=console, show_path=False)])
    run_dir: Path | None = None
    lock: DirLock | None = None
    try:
        cfg, run_dir = resolve_run(args)
        if args.dry_run:
            dry_run(cfg, console)
            return 0
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = DirLock(run_dir)
        try:
            lock.acquire()  # one process per run directory: two could each create the same job
        except DataError as e:
            lock, run_dir = None, None  # the other process's folder: no advice about it
            raise ConfigError(str(e)) from None
        remove_stale_temps(run_dir, skip=("local-jobs", "tinker-jobs"))  # left by writes a kill interrupted
        identity = load_identity(run_dir)
        write_config(run_dir, cfg, header_run_id(run_dir / "config.yaml") or (identity.run if identity else None))
        console.print(f"[bold]run[/] {cfg.name} → {run_dir}"
                      + ("  [yellow](simulated models: a test double)[/]" if cfg.endpoint.kind == "simulator" else ""))
        started = time.monotonic()
        summary = asyncio.run(run_loop(cfg, run_dir, console))
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted.[/]"
                      + (f" Finished work is saved; continue with: python -m harness.loop --resume {run_dir}"
                         if run_dir is not None and (run_dir / "config.yaml").exists() else ""))
        return 130
    except BudgetExceeded as e:
        console.print(f"[bold yellow]stopped:[/] {e}")
        console.print(f"resume with: python -m harness.loop --resume {run_dir} --set budget.max_cost_usd=<higher cap>")
        return EXIT_BUDGET
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {e}")
        advice = _after_error(run_dir, e) if lock is not None else None
        if advice:
            console.print(advice)
        return 2
    except HarnessError as e:
        console.print(f"[bold red]error:[/] {e}")
        advice = _after_error(run_dir, e) if lock is not None else None
        if advice:
            console.print(advice)
        return 1
    finally:
        if lock is not None:
            lock.release()
    print_results([m for it in summary.iterations for m in it.splits.values()], console)
    usage = summary.usage
    cost = usage.get("cost_usd")
    unknown = usage.get("unknown_cost_calls", 0)
    console.print(f"calls {usage.get('calls', 0)} (cache hits {usage.get('cache_hits', 0)}), tokens "
                  f"{usage.get('prompt_tokens', 0)} in / {usage.get('completion_tokens', 0)} out, inference cost "
                  + (f"${cost:.4f}" if cost is not None else "unknown")
                  + (f" + {unknown} calls of unknown price" if unknown else "")
                  + (f"; {usage['unanswered_calls']} call{'s' if usage['unanswered_calls'] != 1 else ''} may have "
                     f"been billed without an answer (worst case "
                     f"${usage.get('unanswered_cost_usd', 0):.4f}, see calls-in-flight.jsonl)"
                     if usage.get("unanswered_calls") else "")
                  + (" (simulated prices)" if summary.simulated else ""))
    for warning in summary.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    console.print(f"finished in {time.monotonic() - started:.1f}s · run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
