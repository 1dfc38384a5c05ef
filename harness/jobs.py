"""`python -m harness.jobs RUN_DIR [--stop | --undeploy]`: what a run left running, and a way to stop it.

Local finetuning jobs outlive the loop on purpose, like hosted jobs: a subprocess or Ray job
keeps training after Ctrl-C (or a crash) of the loop, and `--resume` adopts it rather than
starting it again. A run that will not be resumed has nobody to collect them: this command
lists the run's jobs (status, and where they run: a pid, or a Ray job at its cluster) and, with
`--stop`, stops every one that has not ended -- and any Ray-managed vLLM servers a loop killed
outright left behind.

With the azure provider it lists the run's deployments of finetuned models at Azure (what each
serves, its state, its hourly hosting fee) and, with `--undeploy`, removes them all.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config import load_config
from harness.errors import HarnessError


async def run(run_dir: Path, stop: bool, console: Console, undeploy: bool = False, keep_latest: bool = False) -> int:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise HarnessError(f"{run_dir}: no config.yaml there; is this a run directory?")
    cfg = load_config(str(saved))
    if cfg.finetune.provider == "azure":
        from harness.providers.azure_jobs import azure_deployments

        return await azure_deployments(cfg, run_dir, console, remove=undeploy, keep_latest=keep_latest)
    if undeploy:
        console.print(f"{run_dir}: finetuning provider {cfg.finetune.provider!r} deploys nothing; --undeploy is for "
                      f"provider azure")
        return 0
    if stop and cfg.serve.manage and cfg.serve.runner == "ray":
        from harness.serve_ray import stop_recorded

        for sid in stop_recorded(run_dir / "serve", cfg.serve.ray.address):
            console.print(f"stopped the vLLM server job {sid}")
    if cfg.finetune.provider not in ("local", "tinker"):
        console.print(f"{run_dir}: finetuning provider {cfg.finetune.provider!r}; its jobs are the service's "
                      f"(cancel them there)")
        return 0
    if cfg.finetune.provider == "tinker":  # Tinker training loops are local processes too
        from harness.providers.tinker_ft import TinkerProvider as provider_class
    else:
        from harness.providers.local import LocalProvider as provider_class

    provider = provider_class.from_config(cfg, run_dir)
    if stop:
        stopped = await provider.stop_all()
        console.print(f"stopped {len(stopped)} job(s)" + (": " + ", ".join(s.job_id for s in stopped) if stopped else ""))
    table = Table(title=f"{provider.name} finetuning jobs of {run_dir} ({provider.runner.name} runner, {provider.jobs_dir})")
    for column in ("job", "status", "where", "latest"):
        table.add_column(column, overflow="fold")
    jobs = await provider.placements()
    for state, where in jobs:
        table.add_row(state.job_id, state.raw_status, where or "-", (state.latest_event or "")[:120])
    console.print(table if jobs else f"{run_dir}: no local finetuning jobs")
    active = sum(1 for state, _ in jobs if not state.status.terminal)
    if active and not stop:
        console.print(f"{active} job(s) not ended; `python -m harness.loop --resume {run_dir}` adopts them, "
                      f"`python -m harness.jobs {run_dir} --stop` stops them")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.jobs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--stop", action="store_true", help="stop every job (and Ray-managed server) of the run that still runs")
    p.add_argument("--undeploy", action="store_true",
                   help="provider azure: remove the run's deployments of finetuned models (billed per hour while they exist)")
    p.add_argument("--keep-latest", action="store_true",
                   help="with --undeploy: keep the deployments the run's last iteration debates with")
    args = p.parse_args(argv)
    if args.keep_latest and not args.undeploy:
        p.error("--keep-latest goes with --undeploy")
    console = Console()
    try:
        return asyncio.run(run(args.run_dir, args.stop, console, undeploy=args.undeploy, keep_latest=args.keep_latest))
    except HarnessError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 1
    except (OSError, sqlite3.Error) as e:  # the run directory cannot be read or written
        from harness.ioerrors import explain

        console.print(f"error: {explain(e, args.run_dir)}", markup=False)
        return 1


if __name__ == "__main__":
    sys.exit(main())
