"""`python -m harness.compare`: run a comparison set of methods and write the paper's Table 1.

    python -m harness.compare                                   # paper-table1 on the simulator
    python -m harness.compare --methods debate,multiagent-ft --set task.n_test=500
    python -m harness.compare --set endpoint.kind=openai --set models.base=gpt-4o-mini --out runs/t1-4o-mini

A comparison set is a YAML file under harness/presets/comparisons/ (or any path) listing method
presets. Each method runs through the same loop (`harness.loop`) in <out>/<method>; the user's
--set overrides apply to every method, then the method's `pin` fields are applied again so that
an override never turns one method into another (e.g. debate.agents=5 leaves the single agent
single). Resumable: a method whose run already finished is read, not rerun; an unfinished one is
resumed (paid calls come from its cache); a finished run made with a different configuration is
refused rather than silently mixed into the table.

Writes <out>/table1.md and <out>/table1.csv (one row per method: accuracy ± standard error of
the last iteration's test split, n, iterations, calls, tokens, cost), and a full report
(harness.report) in <out>/report unless --no-report.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from harness.analysis import RunData, load_run, runs_frame, usage_frame
from harness.config import load_config, read_yaml_source
from harness.errors import ConfigError, HarnessError
from harness.fileio import write_atomic

DEFAULT_SET = "paper-table1"


class MethodSpec(BaseModel):
    preset: str  # a preset name or a YAML path
    label: str | None = None  # how the table describes it; default: the run's config name
    pin: dict[str, object] = Field(default_factory=dict)  # dotted.key: value, applied after --set


class ComparisonSet(BaseModel):
    name: str
    methods: list[MethodSpec]


def load_comparison(source: str) -> ComparisonSet:
    data, label = read_yaml_source(source, folder="comparisons", what="comparison set")
    try:
        return ComparisonSet.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{label}: {e}") from None


def method_key(spec: MethodSpec) -> str:
    return Path(spec.preset).stem if spec.preset.endswith((".yaml", ".yml")) else spec.preset


def select(cs: ComparisonSet, methods: str | None) -> list[MethodSpec]:
    """The set's methods, or those named in `methods` (comma-separated); a name not in the set is
    taken as a preset of its own, without pins."""
    if not methods:
        return list(cs.methods)
    by_key = {method_key(m): m for m in cs.methods}
    return [by_key.get(name.strip()) or MethodSpec(preset=name.strip()) for name in methods.split(",") if name.strip()]


def method_overrides(spec: MethodSpec, overrides: list[str]) -> list[str]:
    # JSON is valid YAML, so each pinned value survives the loop's YAML parsing of --set values.
    return [*overrides, *(f"{k}={json.dumps(v)}" for k, v in spec.pin.items())]


def plan_method(spec: MethodSpec, run_dir: Path, overrides: list[str]) -> list[str] | None:
    """The loop's argv for this method: a new run, a resume, or None when its run already
    finished. Raises ConfigError, before anything runs, on a bad override or when run_dir holds
    a run made with another configuration."""
    sets = method_overrides(spec, overrides)
    cfg = load_config(spec.preset, sets)
    set_args = [a for s in sets for a in ("--set", s)]
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return ["--config", spec.preset, "--run-dir", str(run_dir), *set_args]
    # Compared as models, so a run saved before a new config field (with its default) still matches.
    if load_config(str(saved)).model_dump() != cfg.model_dump():
        raise ConfigError(f"{run_dir} holds a run of {method_key(spec)} with a different configuration; "
                          f"use another --out, or delete that directory to rerun it")
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("finished"):
        return None
    return ["--resume", str(run_dir), *set_args]


def run_method(argv: list[str] | None) -> str:
    """Run (or resume) one method through the loop; returns a status word for the table."""
    if argv is None:
        return "reused"
    from harness.loop import main as loop_main

    code = loop_main(argv)
    return {0: "ran", 3: "stopped: budget cap"}.get(code, f"failed (exit {code})")


def write_table(rows: list[tuple[MethodSpec, Path, str]], out: Path, set_name: str) -> pd.DataFrame:
    """table1.csv (numbers) and table1.md (formatted), one row per method, in the set's order."""
    from harness.report import md_table, table1

    runs: list[RunData | None] = [load_run(d) if (d / "config.yaml").is_file() else None for _, d, _ in rows]
    present = [r for r in runs if r is not None]
    frame = runs_frame(present, usage_frame(present)) if present else pd.DataFrame()
    table_rows = []
    it = iter(frame.to_dict("records"))
    for (spec, run_dir, status), run in zip(rows, runs):
        base = next(it) if run is not None else {"method": method_key(spec), "run": str(run_dir), "simulated": None,
                                                 "finished": False, "accuracy": math.nan, "stderr": math.nan, "n": 0,
                                                 "iterations": None, "agents": None, "rounds": None, "calls": None,
                                                 "cache_hits": None, "tokens": None, "trained_tokens": None,
                                                 "cost_known_usd": 0.0, "unknown_cost_items": 0, "cost_usd": math.nan}
        table_rows.append({**base, "label": spec.label or base["method"], "status": status})
    table = pd.DataFrame(table_rows)
    csv = table.drop(columns=["run"]).assign(run_dir=table["run"])
    write_atomic(out / "table1.csv", csv.to_csv(index=False))
    shown = table1(table.fillna({"simulated": False}))
    shown.insert(1, "description", table["label"])
    shown["status"] = table["status"]
    simulated = bool(table["simulated"].fillna(False).any())
    lines = [f"# {set_name}: accuracy ± standard error (last iteration, test split)", ""]
    if simulated:
        lines += ["**SIMULATED**: these runs used the built-in simulator, a test double; the numbers describe "
                  "its rules, not any real model, and the costs are nominal (nobody is billed).", ""]
    lines += [md_table(shown), "",
              "s.e. = sqrt(p(1-p)/n) over all n test problems (an unparseable vote counts as wrong). "
              "Cost = inference + finetuning; 'unknown' or '≥' where some prices are unknown.", ""]
    write_atomic(out / "table1.md", "\n".join(lines))
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comparison", default=DEFAULT_SET,
                   help=f"a comparison set: built-in name or YAML path (default: {DEFAULT_SET})")
    p.add_argument("--methods", help="comma-separated subset (or extra presets), e.g. debate,multiagent-ft")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every method (repeatable)")
    p.add_argument("--out", type=Path, help="output directory (default: runs/<comparison name>)")
    p.add_argument("--no-report", action="store_true", help="write the table only, not the full report")
    args = p.parse_args(argv)
    try:
        cs = load_comparison(args.comparison)
        specs = select(cs, args.methods)
        keys = [method_key(s) for s in specs]
        if len(set(keys)) != len(keys):
            raise ConfigError(f"--methods: a method is listed twice: {keys}")
        out = args.out or Path("runs") / cs.name
        out.mkdir(parents=True, exist_ok=True)
        # Every method's plan first: a bad override or a stale run fails before anything is spent.
        plans = [plan_method(spec, out / key, args.overrides) for spec, key in zip(specs, keys)]
        rows = []
        for spec, key, plan in zip(specs, keys, plans):
            print(f"== {key} → {out / key}" + (" (finished earlier: reused)" if plan is None else ""), flush=True)
            rows.append((spec, out / key, run_method(plan)))
        table = write_table(rows, out, cs.name)
        if not args.no_report:
            from harness.report import build_report

            build_report([d for _, d, _ in rows if (d / "config.yaml").is_file()], out / "report")
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    print((out / "table1.md").read_text(encoding="utf-8"))
    print(f"table: {out / 'table1.md'}, {out / 'table1.csv'}" + ("" if args.no_report else f"; report: {out / 'report'}"))
    return 0 if all(s in ("ran", "reused") for s in table["status"]) else 1


if __name__ == "__main__":
    sys.exit(main())
