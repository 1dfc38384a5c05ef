"""`python -m harness.jobs RUN_DIR [--undeploy]` for the azure provider: the run's deployments of
finetuned models at Azure, what they cost per hour, and their removal.

A simulator run's deployments live in its simulator's state (RUN_DIR/simulator): the simulator
is started on it for the length of the command, as the loop does."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from harness.endpoints import open_endpoint
from harness.errors import HarnessError
from harness.identity import load_identity
from harness.llm.azure_pricing import PRICES_RECORDED, hosting_per_hour
from harness.providers.azure_deploy import model_of, state_of
from harness.providers.azure_ft import azure_provider
from harness.registry import Registry


def _run_id(run_dir: Path) -> str | None:
    identity = load_identity(run_dir)
    if identity is not None:
        return identity.run
    try:
        return Registry.model_validate_json((run_dir / "registry.json").read_bytes()).run
    except (OSError, ValueError):
        return None


def _latest_society(run_dir: Path, cfg) -> set[str]:
    """The models the run's last iteration debates with (what `--keep-latest` keeps)."""
    try:
        registry = Registry.load(run_dir / "registry.json")
    except HarnessError:
        return set()
    last = max((e.iteration for e in registry.entries), default=0)
    generators, critics = registry.models_for(last, max(cfg.debate.agents, cfg.test_agents))
    return set(generators) | set(critics)


async def azure_deployments(cfg, run_dir: Path, console: Console, *, remove: bool, keep_latest: bool = False) -> int:
    run = _run_id(run_dir)
    if run is None:
        console.print(f"{run_dir}: no run id (run.json / registry.json): this run made no deployment")
        return 0
    keep = _latest_society(run_dir, cfg) if keep_latest else set()
    async with open_endpoint(cfg, run_dir) as (urls, _key):
        provider = azure_provider(cfg, urls[0], run_dir)
        try:
            found = await provider.run_deployments(run)
            if remove:
                removed = await provider.undeploy(run, keep=keep)
                kept = sorted(keep & {d["name"] for d in found})
                console.print(f"removed {len(removed)} deployment(s) of run {run}"
                              + (": " + ", ".join(removed) if removed else "")
                              + (f"; kept the last iteration's {len(kept)}: {', '.join(kept)}" if kept else ""))
                return 0
        finally:
            await provider.close()
    if not found:
        console.print(f"{run_dir}: no deployment of run {run} at Azure")
        return 0
    table = Table(title=f"deployments of run {run} (Azure hosting prices recorded {PRICES_RECORDED})")
    for column in ("deployment", "model", "state", "sku", "USD / hour"):
        table.add_column(column, overflow="fold")
    hourly = 0.0
    for d in found:
        sku = str((d.get("sku") or {}).get("name") or "?").lower()
        rate = hosting_per_hour(sku) if sku in ("standard", "globalstandard", "developertier") else None
        hourly += rate or 0.0
        table.add_row(d.get("name", "?"), model_of(d) or "?", state_of(d), sku, "?" if rate is None else f"{rate:.2f}")
    console.print(table)
    console.print(f"${hourly:.2f} per hour while they exist; remove them: python -m harness.jobs {run_dir} --undeploy")
    return 0
