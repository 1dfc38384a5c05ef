"""A local job over several processes, and a job's checkpoints (see docs/finetuning/sharded.md).

`python -m harness.providers.local_train --job-dir DIR` stays the one command a runner starts.
With `processes_per_job: N > 1` that process starts N rank processes of the same module
(`--worker`), the environment torch.distributed reads (RANK, WORLD_SIZE, MASTER_ADDR, ...) set
for each, waits for them and writes the job's final status. The ranks are started here rather
than through torchrun or `accelerate launch` because both put every worker in a session of its
own: the runners stop a job by signalling its process group, and such workers would outlive it
(and keep a GPU). Started here they share the job's group, and a rank whose parent vanished
exits on its own (`watch_parent`). Everything after the start -- process group, FSDP, DDP --
is Trainer's and accelerate's, configured by the JobSpec.

Checkpoints are Trainer's (DIR/checkpoints/checkpoint-<step>); a job started again in DIR
resumes from the newest complete one and drops the progress lines logged after it, so the
step numbers of DIR/progress.jsonl go on without a repeat.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness.fileio import write_atomic, write_jsonl_atomic

CHECKPOINTS = "checkpoints"
MAIN_MODULE = "harness.providers.local_train"


class RankFailed(Exception):
    """A rank of the job failed; its message is the rank's own error (type: message)."""


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def complete_checkpoints(job_dir: Path, world: int) -> list[Path]:
    """The checkpoints a job can resume from, oldest first. Trainer writes a checkpoint's files
    one after another on every rank, the trainer state (rank 0) among the last: a checkpoint
    counts once that state parses and every rank's RNG state is there (a kill during a save
    leaves one without, which is skipped; Trainer keeps the previous one, save_total_limit 2)."""
    found: list[tuple[int, Path]] = []
    for path in (job_dir / CHECKPOINTS).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", path.name)
        if not m or not path.is_dir():
            continue
        try:
            state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rng = ["rng_state.pth"] if world == 1 else [f"rng_state_{r}.pth" for r in range(world)]
        if state.get("global_step") == int(m.group(1)) and all((path / f).exists() for f in rng):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def latest_checkpoint(job_dir: Path, world: int) -> Path | None:
    done = complete_checkpoints(job_dir, world)
    return done[-1] if done else None


def has_checkpoint(job_dir: Path, world: int) -> bool:
    """Whether a job of `world` processes can resume (the resident trainer's jobs: world 1)."""
    return latest_checkpoint(job_dir, world) is not None


def checkpoint_step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[1])


def trim_progress(job_dir: Path, step: int) -> None:
    """Drop the progress lines past `step` (logged after the checkpoint a job resumes from, so
    trained again): the resumed job logs those steps anew, once."""
    path = job_dir / "progress.jsonl"
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        with contextlib.suppress(ValueError):  # a line the kill tore is dropped with the rest
            row = json.loads(line)
            if int(row.get("step", 0)) <= step:
                kept.append(row)
    if len(kept) != len(lines):
        write_jsonl_atomic(path, kept)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def watch_parent(interval_s: float = 0.5) -> None:
    """Exit this rank when the process that started it is gone (killed with SIGKILL, which it
    cannot pass on): an orphaned rank would wait for its peers forever, holding its GPU."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=loop, daemon=True, name="watch-parent").start()


def run_ranks(job_dir: Path, processes: int, python: str | None = None) -> tuple[int, str | None]:
    """Start `processes` ranks of the job on this machine and wait for them all. Returns (exit
    code, the first failed rank's error). When one rank fails the others are stopped: they
    would otherwise wait for it in their next collective until a timeout."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes), "GROUP_RANK": "0"}
    cmd = [python or sys.executable, "-m", MAIN_MODULE, "--job-dir", str(job_dir), "--worker"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(processes)]
    failed: int | None = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), None)
            time.sleep(0.2)
        failed = next((r for r, p in enumerate(procs) if p.returncode not in (None, 0)), failed)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    if failed is None:
        return 0, None
    error_file = job_dir / f"error-rank{failed}.txt"
    error = error_file.read_text(encoding="utf-8").strip() if error_file.exists() else None
    return procs[failed].returncode or 1, error or f"rank {failed} exited with code {procs[failed].returncode}"


def trainer_args(processes: int, sharding: str, device: str) -> dict:
    """Trainer arguments of a job over several processes: FSDP2 (fully_shard, each decoder layer
    a unit; checkpoints sharded, each rank writing its part) or DDP."""
    if processes == 1:
        return {}
    if sharding == "fsdp":
        return {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                              "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                              "state_dict_type": "SHARDED_STATE_DICT"}}
    # LoRA leaves most parameters frozen; DDP must not wait for gradients they never get.
    return {"ddp_find_unused_parameters": False, "ddp_backend": "gloo" if device == "cpu" else "nccl"}


def checkpoint_callback(steps: int | None, minutes: float | None, device: str):
    """A Trainer callback asking for a checkpoint every `steps` optimizer steps and whenever
    `minutes` passed since the last save (never at the last step: its save is the result)."""
    import torch
    from transformers import TrainerCallback

    class Checkpoints(TrainerCallback):
        last = time.monotonic()

        def on_step_end(self, args, state, control, **kw):
            due = bool(steps and state.global_step % steps == 0)
            if minutes is not None:
                due = due or time.monotonic() - self.last >= minutes * 60
                if world_size() > 1:  # a save is collective: every rank must agree, rank 0's clock decides
                    flag = [due]
                    on = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else None
                    torch.distributed.broadcast_object_list(flag, src=0, device=on)
                    due = flag[0]
            if due and state.global_step < state.max_steps:
                control.should_save = True

        def on_save(self, args, state, control, **kw):
            self.last = time.monotonic()

    return Checkpoints()


def cpu_fsdp_trainer(trainer_class: type) -> type:
    """`trainer_class` with FSDP on CPU processes (gloo), for tests on machines without GPUs.
    accelerate turns its FSDP plugin on for accelerators only and falls back to DDP on a CPU,
    while torch's fully_shard itself runs on CPU tensors over gloo: setting the accelerator's
    state to FSDP once it is made runs the same sharded path a GPU job runs. Saving needs one
    change there: the gathered full weights are copied out of the gather's buffers (on a GPU the
    copy to CPU does that), or safetensors finds their storage freed."""

    class CpuFsdpTrainer(trainer_class):
        def create_accelerator_and_postprocess(self) -> None:
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            if getattr(state, "fsdp_plugin", None) is None and self.args.fsdp_plugin_args is not None:
                plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
                if state.mixed_precision != "no":
                    plugin.set_mixed_precision(state.mixed_precision)
                state.fsdp_plugin, state.distributed_type = plugin, DistributedType.FSDP
                self.is_fsdp_enabled = True

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            state = full_state_dict(self.model)
            if self.args.should_save:
                self._save(output_dir or self.args.output_dir, state_dict=state)

    return CpuFsdpTrainer


def full_state_dict(model) -> dict:
    """The whole weights of an FSDP2-sharded model on rank 0 (CPU memory; empty elsewhere);
    every rank must call it. Copied out of the gather's buffers (see cpu_fsdp_trainer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().clone() for k, v in state.items()}


def save_in_published_dtype(model, state: dict, base_model_path: str, out: Path) -> None:
    """Save gathered full weights in the dtype the base model was published in (bfloat16 for
    most 7B models): the float32 master weights served half the disk's and GPU's worth twice."""
    import torch
    from transformers import AutoConfig

    published = getattr(AutoConfig.from_pretrained(base_model_path), "dtype", None)
    if isinstance(published, str):
        published = getattr(torch, published, None)
    half = published in (torch.bfloat16, torch.float16)
    if getattr(model.config, "tie_word_embeddings", False):
        # The gather copied the tied output layer apart from the embeddings it shares; saved
        # once, as the base model was, and tied again on load.
        for key in getattr(model, "_tied_weights_keys", None) or ():
            state.pop(key, None)
    if half:
        state = {k: v.to(published) if v.is_floating_point() else v for k, v in state.items()}
    model.save_pretrained(str(out), state_dict=state)
    if half:  # the config names the dtype of the model object, still float32
        path = Path(out) / "config.json"
        config = json.loads(path.read_text(encoding="utf-8"))
        config["dtype"] = str(published).removeprefix("torch.")
        write_atomic(path, json.dumps(config, indent=2) + "\n")
