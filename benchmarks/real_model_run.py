"""Protocol mode of benchmarks/real_model.py: `--tune` (the DEV problems only, iteration 0, every
candidate of the tuned settings) and `--seed-index K` (every method on seed K's test split,
then records.csv and the README recomputed from whatever seeds are there).

A seed is refused until every tuned setting has a `chosen` value that the rule picks from the
dev results file, so no test problem is debated before the settings are fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel
from rich.console import Console

from harness.config import load_config
from harness.errors import ConfigError, HarnessError
from harness.fileio import iter_jsonl, write_atomic, write_model
from harness.records import DebateRecord
from real_model_methods import free_port, run_method, share_iteration_0
from real_model_analysis import render
from real_model_protocol import Protocol, dev_problems, load_protocol
from real_model_records import (read_diversity, read_rows, replace_seed, replace_seed_diversity, seed_diversity,
                                seed_rows)


class DevCell(BaseModel):
    """Iteration 0 on the dev problems of one seed (or pooled: seed None) at one candidate."""

    key: str
    value: Any
    seed: int | None
    n: int
    accuracy: float  # final-round majority vote
    first_round_accuracy: float
    final_vote_parsed: float
    all_agree: float


class DevResults(BaseModel):
    protocol: str
    rule: dict[str, str]
    cells: list[DevCell]
    chosen_by_rule: dict[str, Any]


def dev_cell(key: str, value: Any, seed: int | None, records: list[DebateRecord]) -> DevCell:
    n = len(records)
    return DevCell(key=key, value=value, seed=seed, n=n, accuracy=sum(r.correct for r in records) / n,
                   first_round_accuracy=sum(r.round_correct[0] for r in records) / n,
                   final_vote_parsed=sum(r.vote.answer is not None for r in records) / n,
                   all_agree=sum(any(len(c.agents) == len(r.agents) for c in r.vote.classes) for r in records) / n)


def pick(protocol: Protocol, key: str, cells: list[DevCell]) -> Any:
    """The rule: highest pooled dev accuracy of the final vote; a tie goes to the candidate listed
    last (the protocol lists temperatures ascending, so the higher one)."""
    pooled = {json.dumps(c.value): c.accuracy for c in cells if c.key == key and c.seed is None}
    candidates = protocol.tuned[key].candidates
    return max(candidates, key=lambda v: (pooled[json.dumps(v)], candidates.index(v)))


@contextlib.contextmanager
def endpoint(protocol: Protocol, log_dir: Path) -> Iterator[list[str]]:
    """The --set lines that point every run at one server this process starts (vLLM), or none
    (the simulator: each run starts its own in-process)."""
    cfg = load_config(protocol.preset)
    if cfg.endpoint.kind != "vllm":
        yield []
        return
    from harness.models import fetch
    from harness.serve import VLLMServer

    model = str(fetch(cfg.serve.model.removeprefix("harness:"))) if cfg.serve.model.startswith("harness:") \
        else cfg.serve.model
    serve = cfg.serve.model_copy(update={"model": model, "port": free_port()})
    server = VLLMServer(serve, agents=cfg.debate.agents, log_path=log_dir / "vllm.log")
    server.start()
    try:
        asyncio.run(server.wait_healthy())
        yield ["serve.manage=false", f"endpoint.base_url={server.base_url}"]
    finally:
        server.stop()


def tune(protocol: Protocol, protocol_path: Path, runs: Path) -> None:
    from harness.loop import run_loop

    cells: list[DevCell] = []
    with endpoint(protocol, runs) as server_sets:
        for key, t in protocol.tuned.items():
            for value in t.candidates:
                records_all: list[DebateRecord] = []
                for seed in protocol.seeds:
                    tuned = {k: (value if k == key else (o.chosen if o.chosen is not None else o.candidates[0]))
                             for k, o in protocol.tuned.items()}
                    cfg = load_config(protocol.preset, [*protocol.sets(seed, tuned=tuned), "finetune.iterations=0",
                                                        *server_sets])
                    run_dir = runs / "tune" / f"{key}={value}" / f"seed-{seed}"
                    run_dir.mkdir(parents=True, exist_ok=True)
                    print(f"== tune {key}={value}, seed {seed}: {protocol.sizes.n_dev} dev problems → {run_dir}",
                          flush=True)
                    asyncio.run(run_loop(cfg, run_dir, Console(), splits=([], dev_problems(protocol, seed))))
                    records = [DebateRecord.model_validate(r) for r in iter_jsonl(run_dir / "iter-0" / "debate-test.jsonl")]
                    cells.append(dev_cell(key, value, seed, records))
                    records_all += records
                cells.append(dev_cell(key, value, None, records_all))
    chosen = {key: pick(protocol, key, cells) for key in protocol.tuned}
    out = protocol_path.parent / "dev-results.json"
    write_model(out, DevResults(protocol=protocol.name, rule={k: t.rule for k, t in protocol.tuned.items()},
                                cells=cells, chosen_by_rule=chosen))
    print(f"\ndev results: {out}")
    for c in cells:
        if c.seed is None:
            print(f"  {c.key}={c.value}: dev accuracy {100 * c.accuracy:.1f}% (first round {100 * c.first_round_accuracy:.1f}%, "
                  f"final vote parsed {100 * c.final_vote_parsed:.1f}%, all agree {100 * c.all_agree:.1f}%), n={c.n}")
    for key, value in chosen.items():
        acc = json.dumps(dev_accuracy(key, cells))
        print(f"\nthe rule picks {key} = {value}. Write into {protocol_path} under tuned.{key}:\n"
              f"    chosen: {json.dumps(value)}\n    dev_results: {out.name}\n    dev_accuracy: {acc}\n"
              f"and commit both files before any seed.")


def dev_accuracy(key: str, cells: list[DevCell]) -> dict[str, float]:
    return {str(c.value): round(c.accuracy, 4) for c in cells if c.key == key and c.seed is None}


def check_tuned(protocol: Protocol, protocol_path: Path) -> None:
    """Refuse a test run unless every tuned setting is the one the dev results pick."""
    for key, t in protocol.tuned.items():
        if t.chosen is None or t.dev_results is None:
            raise ConfigError(f"{protocol_path}: tuned.{key} has no chosen value / dev_results yet; run "
                              f"--tune first, then write both in (the test split must not be debated before)")
        path = protocol_path.parent / t.dev_results
        if not path.is_file():
            raise ConfigError(f"{protocol_path}: tuned.{key}.dev_results {path} does not exist; run --tune")
        results = DevResults.model_validate_json(path.read_text(encoding="utf-8"))
        wanted = pick(protocol, key, results.cells)
        if t.dev_accuracy is not None and t.dev_accuracy != dev_accuracy(key, results.cells):
            raise ConfigError(f"{protocol_path}: tuned.{key}.dev_accuracy {t.dev_accuracy} is not what {path} holds: "
                              f"{json.dumps(dev_accuracy(key, results.cells))}")
        if wanted != t.chosen:
            raise ConfigError(f"{protocol_path}: tuned.{key}.chosen is {t.chosen}, but its rule picks {wanted} from "
                              f"{path}; write chosen: {json.dumps(wanted)}")


def run_seed(protocol: Protocol, protocol_path: Path, index: int, runs: Path, out: Path) -> None:
    if not 0 <= index < len(protocol.seeds):
        raise ConfigError(f"--seed-index {index}: the protocol has seeds {protocol.seeds} (indices 0.."
                          f"{len(protocol.seeds) - 1})")
    check_tuned(protocol, protocol_path)
    seed = protocol.seeds[index]
    seed_dir = runs / f"seed-{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    methods = list(protocol.methods)
    with endpoint(protocol, seed_dir) as server_sets:
        for i, m in enumerate(methods):
            if i > 0:
                share_iteration_0(seed_dir / methods[0], seed_dir / m)
            wall = run_method(m, protocol.sets(seed, m) + server_sets, seed_dir / m, seed_dir / f"{m}.log",
                              preset=protocol.preset)
            print(f"== seed {seed} · {m}: {wall:.0f} s", flush=True)
    collect_seed(protocol, index, runs, out)


def collect_seed(protocol: Protocol, index: int, runs: Path, out: Path) -> None:
    """Seed `index`'s finished runs into records.csv and diversity.csv (that seed's rows replaced,
    the others kept), and the README recomputed from both. Runs nothing."""
    seed = protocol.seeds[index]
    seed_dir, methods = runs / f"seed-{seed}", list(protocol.methods)
    rows = seed_rows(seed_dir, methods, seed, protocol.iterations)
    diversity = seed_diversity(seed_dir, methods, seed, protocol.iterations)
    out.mkdir(parents=True, exist_ok=True)
    replace_seed(out / "records.csv", seed, rows)
    replace_seed_diversity(out / "diversity.csv", seed, diversity)
    write_atomic(out / "README.md", render(read_rows(out / "records.csv"), protocol, read_diversity(out / "diversity.csv")))
    print(f"seed {seed} done: {out / 'records.csv'}, {out / 'diversity.csv'} and {out / 'README.md'} updated; "
          f"commit them now.")


def run_protocol(args) -> int:
    try:
        protocol = load_protocol(args.protocol)
        runs = args.runs_dir / protocol.name
        out = args.out or args.protocol.parent
        if args.tune == (args.seed_index is not None):
            raise ConfigError("--protocol needs exactly one of --tune or --seed-index K")
        if args.tune:
            tune(protocol, args.protocol, runs)
        elif args.collect:
            if not 0 <= args.seed_index < len(protocol.seeds):
                raise ConfigError(f"--seed-index {args.seed_index}: the protocol has seeds {protocol.seeds}")
            collect_seed(protocol, args.seed_index, runs, out)
        else:
            run_seed(protocol, args.protocol, args.seed_index, runs, out)
    except HarnessError as e:
        print(f"protocol error: {e}")
        return 2
    return 0

