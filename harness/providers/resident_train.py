"""Several local LoRA jobs trained by ONE process that loads their base model once:

    python -m harness.providers.resident_train --job-dir D1 --job-dir D2 ... [--checkpoint-every K]

Each DIR is a job directory as `harness.providers.local_train` reads it (spec.json, status.json,
progress.jsonl, the result in DIR/adapter), and each job trains as it would alone: every job is
TRL's own SFTTrainer training loop (its sampler, its loss over labelled tokens, its optimizer,
schedule and gradient clipping), run in a thread of its own over its own adapter of one shared
PeftModel. The threads take turns, one optimizer step each, round-robin: before every step
(`on_step_begin`) a job hands the turn on and waits for it to come back; then its adapter is made
the active one (PEFT trains the active adapter only) and torch's, numpy's and Python's random
states are put back to where this job left them. Exactly one thread computes at any time, so
each job sees the same random numbers (dropout, data order) as in a process of its own, and its
losses match a separate `local_train` job with the same seed (tests/test_resident_train.py).

Checkpoints: every K steps (default 1: a kill loses at most one step per job) each job writes a
Trainer checkpoint of its own adapter, optimizer, schedule, RNG states and step to
DIR/checkpoints/checkpoint-N, written in DIR/checkpoints.partial and renamed into place, the
previous one removed after. Restarted on the same directories, the process resumes each job from
its checkpoint (the Trainer's own resume: it skips the batches already trained in the epoch), and
progress.jsonl is cut back to the checkpoint's step, so no step is trained or recorded twice.

Cancel: the provider writes DIR/cancel.request (and status "cancelled"); the job's thread sees
it when its next turn comes, before its next step, and ends; the other jobs go on.

Why threads and not one hand-written loop: TRL's loop is what a separate job runs; running it as
is keeps the two equal by construction (loss normalisation, sampler seeding, clipping, schedule),
and any change to `local_train.sft_config` (the schedule, accumulation) applies to both.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import random
import shutil
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from harness.fileio import JsonlAppender
from harness.providers import local_dist
from harness.providers.local_train import (JobFile, JobSpec, attach_adapter, load_base, load_job_data, load_tokenizer,
                                           progress_callback, read_status, save_adapter, save_result, setup_torch,
                                           sft_config, write_status)

CANCEL = "cancel.request"  # written by the provider to cancel one job of a running group


class Cancelled(Exception):
    pass


def cancel_requested(job_dir: Path) -> bool:
    return (job_dir / CANCEL).exists()


class Turns:
    """Round-robin turns among the job threads: one holds the turn; a job gives it to the next
    live job in order and waits for its own turn to come back."""

    def __init__(self, order: list[str]):
        self.order = list(order)
        self.current: str | None = self.order[0] if self.order else None
        self.cond = threading.Condition()

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.current == name)

    def pass_on(self, name: str) -> None:
        with self.cond:
            i = self.order.index(name)
            self.current = self.order[(i + 1) % len(self.order)]
            self.cond.notify_all()

    def leave(self, name: str) -> None:
        with self.cond:
            i = self.order.index(name)
            self.order.remove(name)
            if self.current == name:
                self.current = self.order[i % len(self.order)] if self.order else None
            self.cond.notify_all()


def _rng_state() -> tuple:
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    import numpy as np
    import torch

    py, npy, cpu, cuda = state
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


class Job:
    def __init__(self, job_dir: Path, spec: JobSpec, status: JobFile, adapter: str):
        self.dir, self.spec, self.status, self.adapter = job_dir, spec, status, adapter
        self.rng: tuple | None = None  # its random states while another job holds the turn


class Resident:
    """The shared model and the turn-taking of the jobs training on it."""

    def __init__(self, model: Any, jobs: list[Job], vocab: int):
        self.model, self.jobs, self.vocab = model, jobs, vocab  # vocab: the tokenizer's size before training
        self.turns = Turns([job.adapter for job in jobs])

    def take_turn(self, job: Job) -> None:
        self.turns.wait(job.adapter)
        if cancel_requested(job.dir):
            raise Cancelled()
        self.model.set_adapter(job.adapter)  # also makes only this adapter's weights trainable
        if job.rng is not None:
            _set_rng_state(job.rng)

    def hand_on(self, job: Job) -> None:
        job.rng = _rng_state()
        self.turns.pass_on(job.adapter)

    def leave(self, job: Job) -> None:
        self.turns.leave(job.adapter)


def _trainer_class():
    from trl import SFTTrainer

    class ResidentTrainer(SFTTrainer):
        """SFTTrainer whose checkpoints hold only its own adapter and land atomically."""

        adapter_name: str = "default"
        _staging: Path | None = None

        def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
            save_adapter(self.model, Path(output_dir or self.args.output_dir), self.adapter_name)

        def _get_output_dir(self, trial: Any) -> str:
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            root = Path(self.args.output_dir)
            self._staging = root.with_name(root.name + ".partial")
            shutil.rmtree(self._staging, ignore_errors=True)
            try:
                super()._save_checkpoint(model, trial)
            finally:
                staging, self._staging = self._staging, None
            done = staging / f"checkpoint-{self.state.global_step}"
            root.mkdir(parents=True, exist_ok=True)
            os.replace(done, root / done.name)
            for old in root.glob("checkpoint-*"):
                if old.name != done.name:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)

    return ResidentTrainer


def _train_one(resident: Resident, job: Job, tokenizer: Any, device: str, bf16: bool, every: int) -> None:
    from datasets import Dataset
    from transformers import TrainerCallback

    spec, status = job.spec, job.status
    examples, labelled = load_job_data(spec, job.dir, status, tokenizer, device)
    checkpoint = local_dist.latest_checkpoint(job.dir, 1)  # Trainer's layout, as a one-process job writes
    if checkpoint is not None:
        step = local_dist.checkpoint_step(checkpoint)
        local_dist.trim_progress(job.dir, step)
        print(f"{spec.job_id}: resuming from {checkpoint} (step {step})", flush=True)
    progress = JsonlAppender(job.dir / "progress.jsonl")
    shared = progress_callback(job.dir, status, progress)

    class Turn(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            resident.hand_on(job)
            resident.take_turn(job)

        def on_log(self, args, state, control, logs=None, **kw):
            shared.on_log(args, state, control, logs=logs, **kw)

        def on_step_end(self, args, state, control, **kw):
            if not cancel_requested(job.dir):  # the provider's "cancelled" is not overwritten
                shared.on_step_end(args, state, control, **kw)

    args = sft_config(spec, job.dir, device, bf16, save_strategy="steps", save_steps=every)
    trainer = _trainer_class()(model=resident.model, args=args, train_dataset=Dataset.from_list(examples),
                               processing_class=tokenizer, callbacks=[Turn()])
    trainer.adapter_name = job.adapter
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)
    progress.close()
    final = save_result(resident.model, tokenizer, spec, job.dir, resident.vocab, name=job.adapter)
    shutil.rmtree(job.dir / local_dist.CHECKPOINTS, ignore_errors=True)
    status.artifact_path = str(final)
    status.trained_tokens = labelled * spec.epochs


def _run(resident: Resident, job: Job, tokenizer: Any, device: str, bf16: bool, every: int) -> None:
    """One job's thread: its whole training, its final status; the turn is left on every exit."""
    status = job.status
    try:
        resident.take_turn(job)
        _train_one(resident, job, tokenizer, device, bf16, every)
        status.status, status.finished_at = "succeeded", time.time()
        write_status(job.dir, status)
        print(f"job {job.spec.job_id} succeeded: {status.artifact_path}", flush=True)
    except Cancelled:
        status.status, status.finished_at = "cancelled", time.time()
        write_status(job.dir, status)
        print(f"job {job.spec.job_id} cancelled", flush=True)
    except BaseException as e:  # noqa: BLE001 - every failure must land in the job's status.json
        text = traceback.format_exc()
        print(f"job {job.spec.job_id} failed:\n{text}", flush=True)
        with open(job.dir / "train.log", "a", encoding="utf-8") as log:
            log.write(text)
        status.status, status.finished_at = "failed", time.time()
        status.error = f"{type(e).__name__}: {e}"
        write_status(job.dir, status)
    finally:
        resident.leave(job)


def _fail(job_dir: Path, status: JobFile, error: str) -> None:
    status.status, status.finished_at, status.error = "failed", time.time(), error
    write_status(job_dir, status)
    print(f"job {job_dir.name} failed: {error}", flush=True)


def _one_malloc_arena() -> None:
    """Have glibc serve every thread from one malloc arena. By default each thread gets an arena
    of its own, and an arena keeps what its thread freed: the activations of one job's step then
    stay held while the other jobs step, and the process grew by most of a step's activation
    memory per job (9.2 GB for 2 SmolLM2 jobs whose larger one peaks at 7.2 GB alone). Only one
    thread computes at a time here, so sharing one arena costs no contention."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-8, 1)  # M_ARENA_MAX = 1


def group_key(spec: JobSpec) -> tuple | None:
    """Jobs with equal keys may share a resident process; None: this job trains alone."""
    if spec.full_finetune:
        return None
    return (spec.base_model_path, spec.device, spec.threads, spec.gradient_checkpointing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train several local LoRA jobs in one process (one base model).")
    parser.add_argument("--job-dir", type=Path, action="append", required=True)
    parser.add_argument("--checkpoint-every", type=int, default=1, help="optimizer steps between checkpoints")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this process (default: the jobs' own `threads`)")
    args = parser.parse_args(argv)
    jobs: list[Job] = []
    key = None
    rejected = 0  # jobs failed before training: the exit code says not every job succeeded
    for i, job_dir in enumerate(d.resolve() for d in args.job_dir):
        status = read_status(job_dir)
        if status.status in ("cancelled", "succeeded") or cancel_requested(job_dir):
            print(f"job {job_dir.name} is {status.status}; not trained", flush=True)
            continue
        status.status, status.pid, status.started_at = "running", os.getpid(), status.started_at or time.time()
        status.host, status.cuda_visible_devices = socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES")
        status.error = None
        write_status(job_dir, status)
        try:
            spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            _fail(job_dir, status, f"{type(e).__name__}: {e}")
            rejected += 1
            continue
        if group_key(spec) is None or (key is not None and group_key(spec) != key):
            _fail(job_dir, status, "this job cannot share the resident process of the others (a full finetune, or "
                                   "another base model, device or thread count); train it with local_train")
            rejected += 1
            continue
        key = group_key(spec)
        jobs.append(Job(job_dir, spec, status, f"job{i}"))
    if not jobs:
        return 1
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _one_malloc_arena()
    print(f"resident trainer pid {os.getpid()} on {socket.gethostname()}: {len(jobs)} jobs on "
          f"{jobs[0].spec.base_model_path}", flush=True)
    try:
        device, bf16 = setup_torch(jobs[0].spec.model_copy(update={"threads": args.threads or jobs[0].spec.threads}))
        tokenizer = load_tokenizer(jobs[0].spec.base_model_path)
        model = load_base(jobs[0].spec, bf16)
        for job in jobs:
            model = attach_adapter(model, job.spec, job.adapter)
    except BaseException as e:  # noqa: BLE001
        traceback.print_exc()
        for job in jobs:
            _fail(job.dir, job.status, f"{type(e).__name__}: {e}")
        return 1
    resident = Resident(model, jobs, len(tokenizer))
    threads = [threading.Thread(target=_run, args=(resident, job, tokenizer, device, bf16, max(1, args.checkpoint_every)),
                                name=job.spec.job_id, daemon=True) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0 if not rejected and all(job.status.status == "succeeded" for job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
