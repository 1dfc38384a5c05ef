"""`python -m harness.compare`: run a comparison set of methods and write the paper's Table 1 or 2.

    python -m harness.compare --comparison paper-table1              # Table 1's six methods (simulator)
    python -m harness.compare --comparison paper-table2              # Table 2's ablations
    python -m harness.compare --comparison paper-table1 --base openai
    python -m harness.compare --comparison paper-table2 --base vllm --set serve.model=microsoft/Phi-3-mini-128k-instruct

A comparison set is a YAML file under harness/presets/comparisons/ (or any path) listing method
presets. Each method runs through the same loop (`harness.loop`) in <out>/<method>.

How a method's configuration is made, in order:
1. its preset (a simulator run at the paper's sizes); with `--base P`, preset P instead (task,
   endpoint, models, sampling, serve, finetune provider settings, ...) with the method's own
   fields laid over it (METHOD_FIELDS: name, debate, evaluation and the finetune fields that
   define a method), so one preset plus e.g. `--set serve.model=...` sets up every method;
2. on the built-in simulator only, the set's `simulator` fields (smaller sizes, faster jobs);
3. the method's own `overrides` in the set, then the user's --set overrides for every method,
   then the user's --method-set overrides for that method alone (e.g. `--method-set
   star:finetune.iterations=3`: STaR iterates three times while the others keep theirs);
4. the method's `pin` fields again, so an override never turns one method into another (e.g.
   debate.agents=5 leaves the single agent single).
The resolved config is written to <out>/configs/<method>.yaml and the loop runs from it.

Resumable: a method whose run already finished is read, not rerun; an unfinished one is resumed
(paid calls come from its cache); a run made with a different configuration is refused rather
than silently mixed into the table.

Writes <out>/<table>.md and <out>/<table>.csv: per method the last iteration's test accuracy ±
standard error, n, the truncation rate, calls, tokens, cost, and a paired comparison with the
set's reference method (multiagent FT) on the same problems (harness.stats: difference with a
95 % CI, exact McNemar p-value); and a full report (harness.report) in <out>/report unless
--no-report.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sqlite3
import sys
from pathlib import Path

import pandas as pd
from pydantic import BaseModel, Field, ValidationError

from harness.analysis import RunData, load_run, runs_frame, usage_frame
from harness.config import RunConfig, config_from_data, config_to_yaml, load_config, read_yaml_source
from harness.errors import ConfigError, HarnessError
from harness.fileio import iter_jsonl, write_atomic
from harness.records import DebateRecord
from harness.stats import CI_NAME, TEST_NAME, paired_compare

DEFAULT_SET = "paper-table1"
# What defines a method (taken from the method's preset when --base supplies everything else).
METHOD_FIELDS = ("name", "debate", "evaluation", "finetune.iterations", "finetune.selection",
                 "finetune.single_model", "finetune.train_critics", "finetune.start_from")


class MethodSpec(BaseModel):
    preset: str  # a preset name or a YAML path
    label: str | None = None  # how the table describes it; default: the run's config name
    pin: dict[str, object] = Field(default_factory=dict)  # dotted.key: value, applied after --set
    # dotted.key: value for this method alone, set before the user's --set (which still wins), e.g.
    # STaR's own iteration count: {finetune.iterations: 3}. `--method-set star:KEY=VALUE` does the
    # same from the command line, after --set.
    overrides: dict[str, object] = Field(default_factory=dict)


class ComparisonSet(BaseModel):
    name: str
    table: str = "table"  # output file stem: <out>/<table>.md and .csv
    reference: str | None = None  # the method every row is compared with (paired), by preset key
    # dotted.key: value set first when a method runs on the simulator (any --set wins over them)
    simulator: dict[str, object] = Field(default_factory=dict)
    methods: list[MethodSpec]


def load_comparison(source: str) -> ComparisonSet:
    data, label = read_yaml_source(source, folder="comparisons", what="comparison set")
    try:
        cs = ComparisonSet.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{label}: {e}") from None
    if cs.reference is not None and cs.reference not in [method_key(m) for m in cs.methods]:
        raise ConfigError(f"{label}: field 'reference': {cs.reference!r} is not one of its methods")
    return cs


def method_key(spec: MethodSpec) -> str:
    return Path(spec.preset).stem if spec.preset.endswith((".yaml", ".yml")) else spec.preset


def select(cs: ComparisonSet, methods: str | None) -> list[MethodSpec]:
    """The set's methods, or those named in `methods` (comma-separated); a name not in the set is
    taken as a preset of its own, without pins."""
    if not methods:
        return list(cs.methods)
    by_key = {method_key(m): m for m in cs.methods}
    return [by_key.get(name.strip()) or MethodSpec(preset=name.strip()) for name in methods.split(",") if name.strip()]


def _as_sets(fields: dict[str, object]) -> list[str]:
    # JSON is valid YAML, so each value survives the YAML parsing of --set values.
    return [f"{k}={json.dumps(v)}" for k, v in fields.items()]


def _overlay(base: dict, method: dict) -> dict:
    """`base` with the METHOD_FIELDS that `method` defines laid over it."""
    out = copy.deepcopy(base)
    for dotted in METHOD_FIELDS:
        *parents, leaf = dotted.split(".")
        src, dst = method, out
        for p in parents:
            src = src.get(p) if isinstance(src, dict) else None
            dst = dst.setdefault(p, {})
        if isinstance(src, dict) and leaf in src:
            dst[leaf] = copy.deepcopy(src[leaf])
    return out


def method_overrides(items: list[str], specs: list[MethodSpec]) -> dict[str, list[str]]:
    """--method-set METHOD:KEY=VALUE items grouped by method key. A method that is not run, or a
    field the method pins (it would turn it into another method), is a ConfigError."""
    by_key = {method_key(s): s for s in specs}
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, assignment = item.partition(":")
        if not sep or "=" not in assignment or key not in by_key:
            raise ConfigError(f"--method-set {item!r}: write METHOD:KEY=VALUE with METHOD one of "
                              f"{', '.join(by_key)}, e.g. --method-set star:finetune.iterations=3")
        field = assignment.partition("=")[0].strip()
        if field in by_key[key].pin:
            raise ConfigError(f"--method-set {item!r}: {key} pins {field} (it defines the method); "
                              f"choose another method instead")
        out.setdefault(key, []).append(assignment)
    return out


def resolve_method(spec: MethodSpec, cs: ComparisonSet, overrides: list[str], base: str | None,
                   own: list[str] | None = None) -> RunConfig:
    """The method's full configuration (the module docstring's steps 1-4); `own`: the user's
    overrides for this method alone (--method-set)."""
    data, label = read_yaml_source(spec.preset)
    if base is not None:
        base_data, base_label = read_yaml_source(base)
        data, label = _overlay(base_data, data), f"{base_label} with method {label}"
    after = [*_as_sets(spec.overrides), *overrides, *(own or []), *_as_sets(spec.pin)]
    cfg = config_from_data(data, label, after)
    if cfg.endpoint.kind == "simulator" and cs.simulator:
        cfg = config_from_data(data, label + f" and comparison set {cs.name!r}'s simulator sizes",
                               [*_as_sets(cs.simulator), *after])
    return cfg


def plan_method(key: str, cfg: RunConfig, out: Path) -> list[str] | None:
    """The loop's argv for this method: a new run, a resume, or None when its run already
    finished. Raises ConfigError, before anything runs, when the run directory holds a run made
    with another configuration."""
    run_dir = out / key
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        path = out / "configs" / f"{key}.yaml"
        write_atomic(path, config_to_yaml(cfg))
        return ["--config", str(path), "--run-dir", str(run_dir)]
    # Compared as models, so a run saved before a new config field (with its default) still matches.
    if load_config(str(saved)).model_dump() != cfg.model_dump():
        raise ConfigError(f"{run_dir} holds a run of {key} with a different configuration; "
                          f"use another --out, or delete that directory to rerun it")
    summary = run_dir / "summary.json"
    if summary.is_file() and json.loads(summary.read_text(encoding="utf-8")).get("finished"):
        return None
    return ["--resume", str(run_dir)]


def run_method(argv: list[str] | None) -> str:
    """Run (or resume) one method through the loop; returns a status word for the table."""
    if argv is None:
        return "reused"
    from harness.loop import main as loop_main

    code = loop_main(argv)
    return {0: "ran", 3: "stopped: budget cap"}.get(code, f"failed (exit {code})")


def test_outcomes(run_dir: Path) -> dict[str, bool]:
    """{problem id: correct} of the run's last iteration with a test debate."""
    iters = sorted((int(p.parent.name.removeprefix("iter-")), p) for p in run_dir.glob("iter-*/debate-test.jsonl")
                   if p.parent.name.removeprefix("iter-").isdigit())
    return {r.problem.id: r.correct for r in iter_jsonl(iters[-1][1], DebateRecord)} if iters else {}


def _pp(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def paired_columns(keys: list[str], dirs: list[Path], reference: str | None) -> pd.DataFrame:
    """Per method: the paired comparison with the reference method on their common test problems."""
    cols = ["n_paired", "diff_vs_ref", "ci_low", "ci_high", "p_mcnemar", "only_method", "only_ref"]
    ref_outcomes = test_outcomes(dirs[keys.index(reference)]) if reference in keys else {}
    rows = []
    for key, d in zip(keys, dirs):
        pc = paired_compare(test_outcomes(d), ref_outcomes) if ref_outcomes and key != reference else None
        rows.append(dict.fromkeys(cols, math.nan) if pc is None else {
            "n_paired": pc.n, "diff_vs_ref": pc.difference, "ci_low": pc.ci_low, "ci_high": pc.ci_high,
            "p_mcnemar": pc.p_value, "only_method": pc.only_a, "only_ref": pc.only_b})
    return pd.DataFrame(rows, columns=cols)


def write_table(rows: list[tuple[MethodSpec, Path, str]], out: Path, cs: ComparisonSet) -> pd.DataFrame:
    """<table>.csv (numbers) and <table>.md (formatted), one row per method, in the set's order."""
    from harness.report import md_table, table1

    runs: list[RunData | None] = [load_run(d) if (d / "config.yaml").is_file() else None for _, d, _ in rows]
    present = [r for r in runs if r is not None]
    frame = runs_frame(present, usage_frame(present)) if present else pd.DataFrame()
    table_rows = []
    it = iter(frame.to_dict("records"))
    for (spec, run_dir, status), run in zip(rows, runs):
        base = next(it) if run is not None else {"method": method_key(spec), "run": str(run_dir), "simulated": None,
                                                 "finished": False, "local": False, "accuracy": math.nan, "stderr": math.nan, "n": 0,
                                                 "iterations": None, "agents": None, "rounds": None,
                                                 "truncated_rate": math.nan, "calls": None, "cache_hits": None,
                                                 "tokens": None, "trained_tokens": None, "cost_known_usd": 0.0,
                                                 "unknown_cost_items": 0, "cost_usd": math.nan}
        table_rows.append({**base, "method": method_key(spec), "label": spec.label or base["method"],
                           "status": status})
    keys = [method_key(s) for s, _, _ in rows]
    reference = cs.reference if cs.reference in keys else None
    table = pd.concat([pd.DataFrame(table_rows), paired_columns(keys, [d for _, d, _ in rows], reference)], axis=1)
    csv = table.drop(columns=["run"]).assign(run_dir=table["run"], paired_test=TEST_NAME if reference else "")
    write_atomic(out / f"{cs.table}.csv", csv.to_csv(index=False))

    shown = table1(table.fillna({"simulated": False}))
    shown.insert(1, "description", table["label"])
    shown.insert(3, "truncated", [f"{100 * t:.1f}%" if not math.isnan(t) else "n/a" for t in table["truncated_rate"]])
    if reference:
        ref_label = table.loc[keys.index(reference), "label"]
        shown[f"Δ vs {reference} (95% CI)"] = [
            "reference" if k == reference else "n/a" if math.isnan(d) else f"{_pp(d)} [{_pp(lo)}, {_pp(hi)}]"
            for k, d, lo, hi in zip(keys, table["diff_vs_ref"], table["ci_low"], table["ci_high"])]
        shown["p (McNemar)"] = ["" if math.isnan(p) else f"{p:.3g}" for p in table["p_mcnemar"]]
    shown = shown.drop(columns=["finished"])
    shown["status"] = table["status"]
    simulated = bool(table["simulated"].fillna(False).astype(bool).any())
    lines = [f"# {cs.name}: accuracy ± standard error (last iteration, test split)", ""]
    if simulated:
        lines += ["**SIMULATED**: these runs used the built-in simulator, a test double; the numbers describe "
                  "its rules, not any real model, and the costs are nominal (nobody is billed).", ""]
        sizes = ", ".join(f"{k}={v}" for k, v in cs.simulator.items() if k.startswith("task."))
        if sizes:
            lines += [f"Simulator sizes: {sizes} unless --set otherwise (the paper: 500 train / 500 test); "
                      f"n below is what ran.", ""]
    lines += [md_table(shown), "",
              "s.e. = sqrt(p(1-p)/n) over all n test problems (an unparseable vote counts as wrong). "
              "truncated = share of agent replies cut off by max_tokens (they count as unparseable). "
              "Cost = inference + finetuning; 'unknown' or '≥' where some prices are unknown; 'local (no API price)' "
              "for models served by vLLM."]
    if reference:
        lines += ["",
                  f"Δ = accuracy of the method − accuracy of {reference} ({ref_label}) in percentage points, on the "
                  f"test problems both answered (matched by problem id); 95% CI: {CI_NAME}; p: {TEST_NAME}. "
                  f"The CSV has the discordant counts (only_method, only_ref) and n_paired."]
    write_atomic(out / f"{cs.table}.md", "\n".join(lines) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comparison", default=DEFAULT_SET, metavar="SET",
                   help=f"a comparison set: paper-table1, paper-table2, or a YAML path (default: {DEFAULT_SET})")
    p.add_argument("--base", metavar="PRESET",
                   help="a preset (or YAML) supplying everything but the method: task, endpoint, models, "
                        "sampling, serve, finetune provider settings (e.g. openai, vllm)")
    p.add_argument("--methods", help="comma-separated subset (or extra presets), e.g. debate,multiagent-ft")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field of every method (repeatable)")
    p.add_argument("--method-set", dest="method_overrides", action="append", default=[],
                   metavar="METHOD:KEY=VALUE",
                   help="override a config field of one method, after --set (repeatable), e.g. "
                        "star:finetune.iterations=3")
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
        # Every method's config and plan first: a bad override or a stale run fails before anything is spent.
        own = method_overrides(args.method_overrides, specs)
        cfgs = [resolve_method(spec, cs, args.overrides, args.base, own.get(key)) for spec, key in zip(specs, keys)]
        out.mkdir(parents=True, exist_ok=True)
        plans = [plan_method(key, cfg, out) for key, cfg in zip(keys, cfgs)]
        rows = []
        for spec, key, plan in zip(specs, keys, plans):
            print(f"== {key} → {out / key}" + (" (finished earlier: reused)" if plan is None else ""), flush=True)
            rows.append((spec, out / key, run_method(plan)))
        table = write_table(rows, out, cs)
        if not args.no_report:
            from harness.report import build_report

            build_report([d for _, d, _ in rows if (d / "config.yaml").is_file()], out / "report")
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except (OSError, sqlite3.Error) as e:  # a folder that cannot be written (full, read-only, a file)
        from harness.ioerrors import explain

        print(f"error: {explain(e, out, option='--out')}", file=sys.stderr)
        return 1
    print((out / f"{cs.table}.md").read_text(encoding="utf-8"))
    print(f"table: {out / (cs.table + '.md')}, {out / (cs.table + '.csv')}"
          + ("" if args.no_report else f"; report: {out / 'report'}"))
    return 0 if all(s in ("ran", "reused") for s in table["status"]) else 1


if __name__ == "__main__":
    sys.exit(main())
