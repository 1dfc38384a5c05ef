"""`python -m harness.loop`: the whole multiagent-finetuning loop, resumable at every stage.

For each iteration k = 0..L: debate the test split with iteration k's society and write its
metrics; if k < L, debate the train split, build each agent's generator/critic data, finetune
all 2N models (one job each, concurrently) and register them as iteration k+1's society.

With no arguments it runs the `demo` preset on the built-in simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import signal
import sqlite3
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Coroutine, TypeVar

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from harness.config import RunConfig, load_config
from harness.errors import BudgetExceeded, ConfigError, DataError, HarnessError
from harness.evaluate import print_results
from harness.fileio import CorruptRecordError, DirLock, remove_stale_temps
from harness.identity import (RESUMABLE_FIELDS, finished_work, flat, frozen_changes, header_run_id, load_identity,
                              write_config)
from harness.ioerrors import explain as explain_io_error
from harness.llm.usage import usage_line
from harness.plan import batch_wait_note, estimate_plan, plan_table
from harness.providers.factory import make_provider
from harness.run import Run, run_iteration, run_loop
from harness.scaling_report import dry_run_section
from harness.tasks import load_split

log = logging.getLogger("harness")

EXIT_BUDGET = 3
# RESUMABLE_FIELDS: see harness.identity; the loop's engine (Run, run_loop, ...) is harness.run.
__all__ = ["RESUMABLE_FIELDS", "Run", "main", "make_provider", "run_iteration", "run_loop"]


def dry_run(cfg: RunConfig, console: Console) -> None:
    train = load_split(cfg.task, "train") if cfg.finetune.iterations > 0 else []
    test = load_split(cfg.task, "test")
    stages = estimate_plan(cfg, train, test)
    console.print(plan_table(stages, simulated=cfg.endpoint.kind == "simulator"))
    from harness.serve_full import serving_plan_note

    if serving_plan_note(cfg):  # fully finetuned agents: the servers and GPUs each iteration needs
        console.print(serving_plan_note(cfg))
    if cfg.endpoint.batch:
        console.print(batch_wait_note(cfg, stages))
    dry_run_section(cfg, console)  # the GPU estimate of local finetuning with vLLM; nothing otherwise
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
        raise ConfigError(f"--resume {run_dir}: {'a file, not' if run_dir.exists() else 'no such folder, so not'} a run "
                          f"directory; name the folder of the run to continue (runs/<name>-<time> by default)")
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
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--run-dir {run_dir} is a file, not a folder: name a new folder (or a run directory)")
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


T = TypeVar("T")


async def _until_terminated(work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; a SIGTERM cancels it (as asyncio does for Ctrl-C), so its finally blocks stop
    the servers it started, then ends as KeyboardInterrupt. Raising KeyboardInterrupt from a
    plain signal handler, as before, lands wherever Python happens to be: inside a destructor
    (an aiohttp connection's __del__) it is printed as "Exception ignored" and lost, and the run
    went on as if never told to stop."""
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    terminated: list[bool] = []

    def on_term() -> None:
        terminated.append(True)
        task.cancel()

    try:
        previous = signal.getsignal(signal.SIGTERM)
        loop.add_signal_handler(signal.SIGTERM, on_term)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals here
        return await work
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise KeyboardInterrupt from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


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
        summary = asyncio.run(_until_terminated(run_loop(cfg, run_dir, console)))
    except KeyboardInterrupt:
        console.print("[bold yellow]interrupted.[/]"
                      + (f" Finished work is saved; continue with: python -m harness.loop --resume {run_dir}"
                         if run_dir is not None and (run_dir / "config.yaml").exists() else ""))
        return 130
    except BudgetExceeded as e:
        console.print(f"[bold yellow]stopped:[/] {escape(str(e))}")
        console.print(f"resume with: python -m harness.loop --resume {run_dir} --set budget.max_cost_usd=<higher cap>")
        return EXIT_BUDGET
    except ConfigError as e:
        console.print(f"[bold red]config error:[/] {escape(str(e))}")
        advice = _after_error(run_dir, e) if lock is not None else None
        if advice:
            console.print(escape(advice))
        return 2
    except HarnessError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        advice = _after_error(run_dir, e) if lock is not None else None
        if advice:
            console.print(escape(advice))
        return 1
    except (OSError, sqlite3.Error) as e:  # the run directory cannot be written (full, read-only, a file)
        console.print(f"[bold red]error:[/] {escape(explain_io_error(e, run_dir))}")
        return 1
    finally:
        if lock is not None:
            lock.release()
    print_results([m for it in summary.iterations for m in it.splits.values()], console)
    console.print(usage_line(summary.usage, local=cfg.endpoint.kind == "vllm", simulated=summary.simulated),
                  markup=False)
    for warning in summary.warnings:
        console.print(f"[bold yellow]warning:[/] {warning}")
    console.print(f"finished in {time.monotonic() - started:.1f}s · run directory: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
