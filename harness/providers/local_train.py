"""One local finetuning job, run in its own process so a crash in training never kills the loop:

    python -m harness.providers.local_train --job-dir DIR

reads DIR/spec.json (a `JobSpec`), trains with TRL's SFTTrainer and a PEFT LoRA adapter (or all
weights), and writes DIR/status.json (atomically, on every change), DIR/progress.jsonl (one line
per logged step: step, loss, epoch) and the result to DIR/adapter (or DIR/model for a full
finetune). Its stdout and stderr are DIR/train.log. The module's top level imports no training
library, so the provider can import the job models without the `local` extra.

A job of several processes (spec.processes) and its checkpoints: harness/providers/local_dist.py.
Started again in the same DIR, a job resumes from its newest complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from harness.fileio import JsonlAppender, write_atomic, write_model
from harness.providers import local_dist
from harness.providers.weighted_examples import IGNORE, read_examples


class LoraSpec(BaseModel):
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"


class JobSpec(BaseModel):
    job_id: str
    adapter_name: str  # the model id the job produces (the name the adapter is served under)
    metadata: dict[str, str]  # run, iteration, role, agent, ...: how a restarted provider finds the job
    training_file: str
    base_model_path: str
    init_adapter: str | None = None  # continue training this adapter instead of a fresh one
    full_finetune: bool = False
    lora: LoraSpec = Field(default_factory=LoraSpec)
    learning_rate: float = 1e-4
    epochs: int = 2
    batch_size: int = 1
    max_steps: int | None = None  # overrides epochs (finetune.local.single_model_steps)
    max_length: int = 2048
    seed: int = 0
    device: str = "auto"
    # Recompute activations in the backward pass instead of keeping them (TRL's default): it
    # saves GPU memory at the price of a second forward pass, ~30 % more compute. None: on a GPU
    # only; a CPU has the memory, and there the extra pass is pure loss (measured on
    # SmolLM2-135M: 4.9 s vs 6.5 s per batch of 4x100 tokens; benchmarks/train_throughput.py).
    gradient_checkpointing: bool | None = None
    threads: int | None = None  # CPU threads for torch (torch.set_num_threads); None: torch's default
    max_lora_rank: int | None = None  # the server's limit; the adapter is checked against it
    # finetune.local's processes_per_job, sharding (resolved: fsdp or ddp), schedule and
    # checkpoints; the defaults are a job as before them (one process, linear, no warmup).
    processes: int = 1
    sharding: str = "ddp"
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.0
    bf16: bool | None = None  # None: where the GPU has it
    checkpoint_steps: int | None = None
    checkpoint_minutes: float | None = None
    created_at: float = Field(default_factory=time.time)


class JobFile(BaseModel):
    """DIR/status.json: written by the provider before the job starts (queued) and when it
    cancels a job or finds it dead; otherwise by the job (its launch goes to launch.json)."""

    status: str = "queued"  # queued | running | succeeded | failed | cancelled
    pid: int | None = None
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    trained_tokens: int | None = None
    dropped_examples: int = 0  # examples left out because max_length would cut a weighted turn
    artifact_path: str | None = None
    error: str | None = None
    # Where the job ran: its machine and the GPUs it was given (set by the runner: one per job).
    host: str | None = None
    cuda_visible_devices: str | None = None
    updated_at: float = Field(default_factory=time.time)


def read_status(job_dir: Path) -> JobFile:
    path = job_dir / "status.json"
    if not path.exists():
        return JobFile()
    return JobFile.model_validate_json(path.read_text(encoding="utf-8"))


def write_status(job_dir: Path, status: JobFile) -> None:
    status.updated_at = time.time()
    write_model(job_dir / "status.json", status)


# ----------------------------------------------------------------------------- training

def _device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("finetune.local.device is 'cuda' but torch sees no GPU; use 'auto' or 'cpu'")
    return requested


def setup_torch(spec: JobSpec) -> tuple[str, bool]:
    """(device, bf16) of a job, with torch's CPU threads set as the spec asks."""
    import torch

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    device = _device(spec.device)
    return device, spec.bf16 if spec.bf16 is not None else device == "cuda" and torch.cuda.is_bf16_supported()


def load_tokenizer(base_model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        # Reuse EOS rather than adding a pad token: a new token would resize the embeddings and
        # vLLM cannot serve an adapter over a changed vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_job_data(spec: JobSpec, job_dir: Path, status: JobFile, tokenizer: Any, device: str) -> tuple[list[dict], int]:
    """(the job's tokenized examples, their labelled tokens); the dropped count goes to status.json
    (from rank 0 only, in a job of several processes)."""
    import torch

    examples, status.dropped_examples = read_examples(Path(spec.training_file), tokenizer, spec.max_length)
    if local_dist.rank() == 0:
        write_status(job_dir, status)  # the provider shows the dropped count while the job trains
    labelled = sum(sum(1 for t in ex["labels"] if t != IGNORE) for ex in examples)
    world = local_dist.world_size()
    print(f"{spec.job_id}: {len(examples)} examples ({status.dropped_examples} dropped), {labelled} labelled tokens, "
          f"device {device}, gradient checkpointing {'on' if _checkpointing(spec, device) else 'off'}, "
          f"{torch.get_num_threads()} CPU threads"
          + (f", rank {local_dist.rank()} of {world} ({spec.sharding})" if world > 1 else ""), flush=True)
    return examples, labelled


def _checkpointing(spec: JobSpec, device: str) -> bool:
    return spec.gradient_checkpointing if spec.gradient_checkpointing is not None else device != "cpu"


def _sharded(spec: JobSpec) -> bool:
    return spec.processes > 1 and spec.sharding == "fsdp"


def load_base(spec: JobSpec, bf16: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    # A sharded full finetune keeps float32 weights (bf16 is the compute dtype, FSDP's mixed
    # precision): Adam's steps at lr 1e-5 are below bfloat16's resolution of most weights.
    dtype = torch.bfloat16 if bf16 and not _sharded(spec) else torch.float32
    return AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=dtype)


def attach_adapter(model: Any, spec: JobSpec, name: str = "default") -> Any:
    """The job's trainable LoRA adapter on `model` under `name`: its init_adapter, or a fresh one
    drawn from torch's RNG seeded with the job's seed, so the same spec starts from the same
    weights whether its process holds one adapter or several (harness.providers.resident_train)
    and whatever its process count (Trainer seeds torch only later).
    `model` may already be a PeftModel holding other jobs' adapters; returns the PeftModel."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    if spec.init_adapter:
        if isinstance(model, PeftModel):
            model.load_adapter(spec.init_adapter, adapter_name=name, is_trainable=True)
            return model
        return PeftModel.from_pretrained(model, spec.init_adapter, adapter_name=name, is_trainable=True)
    config = LoraConfig(r=spec.lora.r, lora_alpha=spec.lora.alpha, lora_dropout=spec.lora.dropout,
                        target_modules=spec.lora.target_modules, task_type="CAUSAL_LM")
    torch.manual_seed(spec.seed)
    if isinstance(model, PeftModel):
        model.add_adapter(name, config)
        return model
    return get_peft_model(model, config, adapter_name=name)


def sft_config(spec: JobSpec, job_dir: Path, device: str, bf16: bool, **override: Any) -> Any:
    """The TRL arguments of a job; the resident trainer uses the same ones, so both train alike."""
    from trl import SFTConfig

    fields: dict[str, Any] = dict(
        output_dir=str(job_dir / local_dist.CHECKPOINTS), num_train_epochs=spec.epochs,
        max_steps=spec.max_steps or -1, per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.learning_rate,
        lr_scheduler_type="constant_with_warmup" if spec.lr_scheduler == "constant" else spec.lr_scheduler,
        warmup_steps=spec.warmup_ratio, logging_steps=1,  # below 1: a share of the steps (ceil)
        # Saves come from local_dist's checkpoint callback (steps or minutes); two are kept, so a
        # kill in the middle of writing one leaves the one before it.
        save_strategy="no", save_total_limit=2,
        report_to=[], seed=spec.seed, use_cpu=device == "cpu", bf16=bf16,
        max_length=spec.max_length, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=_checkpointing(spec, device),
        **local_dist.trainer_args(spec.processes, spec.sharding, device),
    )
    return SFTConfig(**{**fields, **override})


def progress_callback(job_dir: Path, status: JobFile, progress: JsonlAppender | None) -> Any:
    """A TrainerCallback writing DIR/progress.jsonl (one line per logged step) and status.json;
    `progress` None: a rank other than 0 of a multi-process job, which writes neither."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if progress is not None and logs and "loss" in logs:
                progress.append({"step": state.global_step, "loss": logs["loss"], "epoch": logs.get("epoch"),
                                 "learning_rate": logs.get("learning_rate"), "time": time.time()})
                status.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kw):
            status.step, status.total_steps = state.global_step, state.max_steps
            if progress is not None:
                write_status(job_dir, status)

    return Progress()


def save_adapter(model: Any, path: Path, name: str | None = None) -> None:
    """Write the model (or only adapter `name` of a PeftModel holding several) to `path`, in the
    layout of a single-adapter save: PEFT puts a non-default adapter in a subfolder."""
    if name is None or name == "default":
        model.save_pretrained(str(path), **({"selected_adapters": [name]} if name else {}))
        return
    staging = path.with_name(path.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(str(staging), selected_adapters=[name])
    shutil.rmtree(path, ignore_errors=True)
    os.replace(staging / name, path)
    shutil.rmtree(staging, ignore_errors=True)


def _publish(tmp: Path, spec: JobSpec, job_dir: Path, tokenizer: Any, vocab_before: int) -> Path:
    """Check the result written to `tmp` and rename it into place (DIR/adapter or DIR/model), so a
    crash never leaves a half-written one."""
    from harness.serve import validate_adapter

    final = job_dir / ("model" if spec.full_finetune else "adapter")
    if len(tokenizer) != vocab_before:
        raise RuntimeError(f"the vocabulary changed during training ({vocab_before} -> {len(tokenizer)})")
    if not spec.full_finetune and spec.max_lora_rank is not None:
        validate_adapter(tmp, max_lora_rank=spec.max_lora_rank)
    os.replace(tmp, final)
    return final


def _partial(spec: JobSpec, job_dir: Path) -> Path:
    tmp = job_dir / (("model" if spec.full_finetune else "adapter") + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def save_result(model: Any, tokenizer: Any, spec: JobSpec, job_dir: Path, vocab_before: int,
                name: str | None = None) -> Path:
    """The job's final adapter (or model) of a one-process job, checked and renamed into place."""
    tmp = _partial(spec, job_dir)
    save_adapter(model, tmp, None if spec.full_finetune else name)
    if spec.full_finetune:
        tokenizer.save_pretrained(str(tmp))
    return _publish(tmp, spec, job_dir, tokenizer, vocab_before)


def train(spec: JobSpec, job_dir: Path, status: JobFile) -> JobFile:
    """Train on this process: the whole job, or one rank of it (RANK/WORLD_SIZE set by
    local_dist.run_ranks); only rank 0 writes status, progress and the result's final folder."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    main_rank, world = local_dist.rank() == 0, local_dist.world_size()
    device, bf16 = setup_torch(spec)
    tokenizer = load_tokenizer(spec.base_model_path)
    vocab_before = len(tokenizer)
    examples, labelled = load_job_data(spec, job_dir, status, tokenizer, device)
    args = sft_config(spec, job_dir, device, bf16)
    set_seed(spec.seed)
    model = load_base(spec, bf16)
    if not spec.full_finetune:
        model = attach_adapter(model, spec)

    progress = JsonlAppender(job_dir / "progress.jsonl") if main_rank else None
    sharded = _sharded(spec)
    # A pre-tokenized dataset with a `labels` column: TRL uses the labels as given and its
    # default collator pads them with -100, so the per-turn masks survive batching.
    trainer_class = local_dist.cpu_fsdp_trainer(SFTTrainer) if sharded and device == "cpu" else SFTTrainer
    checkpoints = local_dist.checkpoint_callback(spec.checkpoint_steps, spec.checkpoint_minutes, device)
    trainer = trainer_class(model=model, args=args, train_dataset=Dataset.from_list(examples),
                            processing_class=tokenizer, callbacks=[progress_callback(job_dir, status, progress), checkpoints])
    resume = local_dist.latest_checkpoint(job_dir, world)
    if resume is not None:
        print(f"resuming from {resume.name}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if progress is not None:
        progress.close()

    if sharded:
        state = local_dist.full_state_dict(trainer.model)  # collective: every rank sends its shards
        if not main_rank:
            return status
        tmp = _partial(spec, job_dir)
        local_dist.save_in_published_dtype(trainer.model, state, spec.base_model_path, tmp)
        tokenizer.save_pretrained(str(tmp))
        final = _publish(tmp, spec, job_dir, tokenizer, vocab_before)
    elif main_rank:
        final = save_result(trainer.model, tokenizer, spec, job_dir, vocab_before)
    else:
        return status
    shutil.rmtree(job_dir / local_dist.CHECKPOINTS, ignore_errors=True)  # the result is `final`
    status.artifact_path = str(final)
    status.trained_tokens = labelled * spec.epochs
    if world > 1:
        write_status(job_dir, status)  # for the launching process, which writes the final status
    return status


def _worker(job_dir: Path) -> int:
    """One rank of a job of several processes (started by local_dist.run_ranks)."""
    local_dist.watch_parent()
    try:
        spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        train(spec, job_dir, read_status(job_dir))
    except BaseException as e:  # noqa: BLE001 - the launching process reports it in status.json
        traceback.print_exc()
        sys.stdout.flush()
        write_atomic(job_dir / f"error-rank{local_dist.rank()}.txt", f"{type(e).__name__}: {e}")
        return 1
    return 0


def _prepare_resume(spec: JobSpec, job_dir: Path, status: JobFile) -> None:
    """Before (re)starting: a checkpoint to resume from drops the progress logged after it."""
    for stale in job_dir.glob("error-rank*.txt"):
        stale.unlink()
    resume = local_dist.latest_checkpoint(job_dir, spec.processes)
    if resume is not None:
        status.step = local_dist.checkpoint_step(resume)
        local_dist.trim_progress(job_dir, status.step)
    else:  # started over: what an earlier attempt logged or saved (half a save, another process count) goes
        (job_dir / "progress.jsonl").unlink(missing_ok=True)
        shutil.rmtree(job_dir / local_dist.CHECKPOINTS, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one local finetuning job described by DIR/spec.json.")
    parser.add_argument("--job-dir", type=Path, required=True)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a rank of a multi-process job
    parsed = parser.parse_args(argv)
    job_dir = parsed.job_dir.resolve()
    if parsed.worker:
        return _worker(job_dir)
    status = read_status(job_dir)
    if status.status == "cancelled":  # cancelled between the provider's launch and this start
        print(f"job {job_dir.name} was cancelled before it started", flush=True)
        return 1
    if status.status == "succeeded" and status.artifact_path and Path(status.artifact_path).exists():
        print(f"job {job_dir.name} already succeeded: {status.artifact_path}", flush=True)
        return 0
    # From here on status.json is this process's: the provider records its launch elsewhere
    # (launch.json), so neither overwrites what the other wrote.
    status.status, status.pid, status.started_at = "running", os.getpid(), status.started_at or time.time()
    status.finished_at, status.error = None, None
    status.host, status.cuda_visible_devices = socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES")
    write_status(job_dir, status)
    print(f"job {job_dir.name} on {status.host}, CUDA_VISIBLE_DEVICES={status.cuda_visible_devices}", flush=True)
    try:
        spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _prepare_resume(spec, job_dir, status)
        write_status(job_dir, status)
        if spec.processes > 1:
            code, error = local_dist.run_ranks(job_dir, spec.processes)
            status = read_status(job_dir)  # rank 0's progress and result
            if code:
                raise local_dist.RankFailed(error)
            if not status.artifact_path:
                raise RuntimeError("the ranks ended without a result")
        else:
            status = train(spec, job_dir, status)
    except BaseException as e:  # noqa: BLE001 - every failure must land in status.json
        traceback.print_exc()
        sys.stdout.flush()
        status.status, status.finished_at = "failed", time.time()
        status.error = str(e) if isinstance(e, local_dist.RankFailed) else f"{type(e).__name__}: {e}"
        write_status(job_dir, status)
        return 1
    status.status, status.finished_at = "succeeded", time.time()
    write_status(job_dir, status)
    print(f"job {spec.job_id} succeeded: {status.artifact_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
