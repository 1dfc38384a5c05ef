"""`python -m harness.sim --port N [--seed S --latency-ms X --error-rate R ...]`: run the
simulator standalone on 127.0.0.1 until interrupted."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from harness.config import SimulatorConfig
from harness.sim.server import SimServer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.sim",
        description="Run the simulated OpenAI-compatible server (a test double: its models are simulated).",
    )
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: a free one)")
    p.add_argument("--state-dir", type=Path, default=None, help="persist files and fine-tuning jobs here")
    # One flag per SimulatorConfig field, so the CLI never lags behind the config.
    for name, field in SimulatorConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation == list[str]:  # e.g. --unapplied-adapters 'run-*' (repeat the flag for more)
            p.add_argument(flag, action="append", default=None, help=f"SimulatorConfig.{name} (repeatable)")
            continue
        kind = int if field.annotation in (int, int | None) else float
        p.add_argument(flag, type=kind, default=None, help=field.description or f"SimulatorConfig.{name} (default {field.default})")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    values = {k: getattr(args, k) for k in SimulatorConfig.model_fields if getattr(args, k) is not None}
    try:
        cfg = SimulatorConfig(**values)
    except ValidationError as e:
        first = e.errors()[0]
        print(f"error: --{str(first['loc'][0]).replace('_', '-')}: {first['msg']}", file=sys.stderr)
        return 2
    server = SimServer(cfg, port=args.port, state_dir=args.state_dir).start()
    print(f"SIMULATED OpenAI-compatible server (a test double, not a real model) at {server.base_url}")
    print(f"settings: {cfg.model_dump()}")
    print("press Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
