"""Wall time of the default command (`python -m harness.loop`, the simulated demo), end to end:
interpreter start, simulator, debates and the demo preset's finetuning iterations, report.

tests/test_loop.py checks what the demo does, never how long it takes (a loaded machine must not
turn a test red); the time is measured here, on a machine left alone while it runs. It prints
the median of --repeats runs and the machine's load average, so a slow number can be told apart
from a busy machine.

    python benchmarks/demo_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    times = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, "-m", "harness.loop", "--run-dir", f"{tmp}/run"], cwd=tmp,
                                  capture_output=True, text=True)
            times.append(time.monotonic() - t0)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
            return 1
        print(f"run {i + 1}: {times[-1]:.1f} s", flush=True)
    print(f"demo wall time: median {statistics.median(times):.1f} s over {len(times)} runs "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
