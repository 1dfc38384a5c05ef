"""One local finetuning job, run in its own process so a crash in training never kills the loop:

    python -m harness.providers.local_train --job-dir DIR

reads DIR/spec.json (a `JobSpec`), trains with TRL's SFTTrainer and a PEFT LoRA adapter (or all
weights), and writes DIR/status.json (atomically, on every change), DIR/progress.jsonl (one line
per logged step: step, loss, epoch) and the result to DIR/adapter (or DIR/model for a full
finetune). Its stdout and stderr are DIR/train.log. The module's top level imports no training
library, so the provider can import the job models without the `local` extra.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from harness.fileio import JsonlAppender, write_model

IGNORE = -100  # label of tokens that carry no loss (PyTorch's cross-entropy ignore_index)


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


# ----------------------------------------------------------------------------- tokenization

def _label_spans(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of the whole conversation, untruncated (see tokenize_weighted)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(plain)
    # The template already holds BOS and role markers; adding special tokens again would double BOS.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start_text, end_text = render(plain[:i], gen=True), render(plain[: i + 1])
        start, end = len(start_text), len(end_text)
        if not full.startswith(end_text):
            # Templates such as Phi-3's close a conversation that does not end in a generation
            # prompt with an extra marker (eos), so a partial render is not a prefix of the full
            # one. The turn then ends where the two renders part. Compared character by
            # character they may agree on the first characters of two different special tokens
            # ("<|" of "<|endoftext|>" and "<|user|>"), so the end moves back to the start of a
            # token it would otherwise cut: a next turn's marker must never carry loss.
            end = len(os.path.commonprefix([end_text, full]))
            end = next((a for a, b in offsets if a < end < b), end)
        if not full.startswith(start_text) or end <= start:
            raise ValueError("the model's chat template renders earlier turns differently once later turns "
                             "follow, so per-turn loss masks cannot be located; use a model whose template "
                             "is prefix-stable")
        spans.append((start, end))
    labels = [tid if any(a < e and b > s for s, e in spans) else IGNORE for tid, (a, b) in zip(ids, offsets)]
    return ids, labels


def _fit(ids: list[int], labels: list[int], max_length: int | None) -> tuple[dict | None, str | None]:
    """(example, None), or (None, why it is dropped): "unweighted" (nothing to learn) or
    "too_long" (max_length would cut a weighted turn)."""
    if all(label == IGNORE for label in labels):
        return None, "unweighted"
    if max_length is not None and len(ids) > max_length:
        # A turn cut before its end-of-turn marker would teach the model to run on without
        # stopping, and a turn cut away entirely leaves a conversation without its point (a
        # critic's updated answer): such an example is dropped, not silently shortened.
        if any(label != IGNORE for label in labels[max_length:]):
            return None, "too_long"
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}, None


def tokenize_weighted(tokenizer: Any, messages: list[dict], max_length: int | None = None) -> dict | None:
    """Token ids and labels of one chat example, with loss only on assistant turns of weight 1.

    TRL's own `assistant_only_loss` cannot express this: it masks every assistant turn alike, and
    only for chat templates carrying `{% generation %}` markers, which most hub models' templates
    lack. So the whole conversation is rendered once with the model's template, each assistant
    turn's character span is found by rendering the prefix up to it (with the generation prompt)
    and through it, and a token is labelled iff it overlaps a weight-1 turn's span. The span
    includes the template's end-of-turn marker, so the model also learns where to stop. Returns
    None when nothing is left to learn (all turns weight 0), or when max_length would cut into a
    weight-1 turn (the example is dropped rather than taught without its end)."""
    return _fit(*_label_spans(tokenizer, messages), max_length)[0]


def read_examples(path: Path, tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """The training examples of a chat JSONL and how many were dropped because max_length would
    cut a weighted turn. Each skipped line is reported on stdout (the job's train.log); raises
    ValueError saying why when no example is left."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training file {path} does not exist")
    examples: list[dict] = []
    too_long: list[int] = []  # token counts of the dropped examples
    unweighted = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'messages' ({e})") from e
            ids, labels = _label_spans(tokenizer, messages)
            example, why = _fit(ids, labels, max_length)
            if example is not None:
                examples.append(example)
            elif why == "too_long":
                too_long.append(len(ids))
                print(f"warning: {path}:{n}: dropped: {len(ids)} tokens, and max_length {max_length} would cut "
                      f"a weight-1 assistant turn before its end", flush=True)
            else:
                unweighted += 1
                print(f"{path}:{n}: no weight-1 assistant turn; skipped", flush=True)
    if too_long:
        print(f"warning: {len(too_long)} of {len(examples) + len(too_long) + unweighted} examples dropped as longer "
              f"than max_length {max_length} (finetune.local.max_length)", flush=True)
    if not examples:
        if too_long:
            raise ValueError(f"{path}: nothing left to train on: {len(too_long)} example(s) need more than "
                             f"finetune.local.max_length={max_length} tokens (the longest {max(too_long)}) and "
                             f"{unweighted} have no weight-1 assistant turn; raise finetune.local.max_length")
        raise ValueError(f"{path}: no example with a weight-1 assistant turn to train on")
    return examples, len(too_long)


def load_examples(path: Path, tokenizer: Any, max_length: int) -> list[dict]:
    return read_examples(path, tokenizer, max_length)[0]


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
    return device, device == "cuda" and torch.cuda.is_bf16_supported()


def load_tokenizer(base_model_path: str) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_path)
    if tokenizer.pad_token is None:
        # Reuse EOS rather than adding a pad token: a new token would resize the embeddings and
        # vLLM cannot serve an adapter over a changed vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_job_data(spec: JobSpec, job_dir: Path, status: JobFile, tokenizer: Any, device: str) -> tuple[list[dict], int]:
    """(the job's tokenized examples, their labelled tokens); the dropped count goes to status.json."""
    import torch

    examples, status.dropped_examples = read_examples(Path(spec.training_file), tokenizer, spec.max_length)
    write_status(job_dir, status)  # the provider shows the dropped count while the job trains
    labelled = sum(sum(1 for t in ex["labels"] if t != IGNORE) for ex in examples)
    print(f"{spec.job_id}: {len(examples)} examples ({status.dropped_examples} dropped), {labelled} labelled tokens, "
          f"device {device}, gradient checkpointing {'on' if _checkpointing(spec, device) else 'off'}, "
          f"{torch.get_num_threads()} CPU threads", flush=True)
    return examples, labelled


def _checkpointing(spec: JobSpec, device: str) -> bool:
    return spec.gradient_checkpointing if spec.gradient_checkpointing is not None else device != "cpu"


def load_base(spec: JobSpec, bf16: bool) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=torch.bfloat16 if bf16 else torch.float32)


def attach_adapter(model: Any, spec: JobSpec, name: str = "default") -> Any:
    """The job's trainable LoRA adapter on `model` under `name`: its init_adapter, or a fresh one
    drawn from torch's RNG seeded with the job's seed, so the same spec starts from the same
    weights whether its process holds one adapter or several (harness.providers.resident_train).
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
        output_dir=str(job_dir / "checkpoints"), num_train_epochs=spec.epochs, max_steps=spec.max_steps or -1,
        per_device_train_batch_size=spec.batch_size, learning_rate=spec.learning_rate,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no",
        report_to=[], seed=spec.seed, use_cpu=device == "cpu", bf16=bf16,
        max_length=spec.max_length, dataloader_num_workers=0, disable_tqdm=True,
        gradient_checkpointing=_checkpointing(spec, device),
    )
    return SFTConfig(**{**fields, **override})


def progress_callback(job_dir: Path, status: JobFile, progress: JsonlAppender) -> Any:
    """A TrainerCallback writing DIR/progress.jsonl (one line per logged step) and status.json."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                progress.append({"step": state.global_step, "loss": logs["loss"], "epoch": logs.get("epoch"),
                                 "learning_rate": logs.get("learning_rate"), "time": time.time()})
                status.loss = float(logs["loss"])

        def on_step_end(self, args, state, control, **kw):
            status.step, status.total_steps = state.global_step, state.max_steps
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


def save_result(model: Any, tokenizer: Any, spec: JobSpec, job_dir: Path, vocab_before: int,
                name: str | None = None) -> Path:
    """The job's final adapter (or model), written next to DIR/adapter and renamed into place, so a
    crash never leaves a half-written one; checked against the server's rank limit first."""
    from harness.serve import validate_adapter

    final = job_dir / ("model" if spec.full_finetune else "adapter")
    tmp = job_dir / (final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, None if spec.full_finetune else name)
    if spec.full_finetune:
        tokenizer.save_pretrained(str(tmp))
    if len(tokenizer) != vocab_before:
        raise RuntimeError(f"the vocabulary changed during training ({vocab_before} -> {len(tokenizer)})")
    if not spec.full_finetune and spec.max_lora_rank is not None:
        validate_adapter(tmp, max_lora_rank=spec.max_lora_rank)
    os.replace(tmp, final)
    return final


def train(spec: JobSpec, job_dir: Path, status: JobFile) -> JobFile:
    from datasets import Dataset
    from trl import SFTTrainer

    device, bf16 = setup_torch(spec)
    tokenizer = load_tokenizer(spec.base_model_path)
    vocab_before = len(tokenizer)
    examples, labelled = load_job_data(spec, job_dir, status, tokenizer, device)
    model = load_base(spec, bf16)
    if not spec.full_finetune:
        model = attach_adapter(model, spec)

    progress = JsonlAppender(job_dir / "progress.jsonl")
    # A pre-tokenized dataset with a `labels` column: TRL uses the labels as given and its
    # default collator pads them with -100, so the per-turn masks survive batching.
    trainer = SFTTrainer(model=model, args=sft_config(spec, job_dir, device, bf16),
                         train_dataset=Dataset.from_list(examples), processing_class=tokenizer,
                         callbacks=[progress_callback(job_dir, status, progress)])
    trainer.train()
    progress.close()

    final = save_result(trainer.model, tokenizer, spec, job_dir, vocab_before)
    # save_strategy='no' leaves only Trainer scratch there; the result is `final`.
    shutil.rmtree(job_dir / "checkpoints", ignore_errors=True)
    status.artifact_path = str(final)
    status.trained_tokens = labelled * spec.epochs
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one local finetuning job described by DIR/spec.json.")
    parser.add_argument("--job-dir", type=Path, required=True)
    job_dir = parser.parse_args(argv).job_dir.resolve()
    status = read_status(job_dir)
    if status.status == "cancelled":  # cancelled between the provider's launch and this start
        print(f"job {job_dir.name} was cancelled before it started", flush=True)
        return 1
    # From here on status.json is this process's: the provider records its launch elsewhere
    # (launch.json), so neither overwrites what the other wrote.
    status.status, status.pid, status.started_at = "running", os.getpid(), status.started_at or time.time()
    status.host, status.cuda_visible_devices = socket.gethostname(), os.environ.get("CUDA_VISIBLE_DEVICES")
    write_status(job_dir, status)
    print(f"job {job_dir.name} on {status.host}, CUDA_VISIBLE_DEVICES={status.cuda_visible_devices}", flush=True)
    try:
        spec = JobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        status = train(spec, job_dir, status)
    except BaseException as e:  # noqa: BLE001 - every failure must land in status.json
        traceback.print_exc()
        sys.stdout.flush()
        status.status, status.finished_at = "failed", time.time()
        status.error = f"{type(e).__name__}: {e}"
        write_status(job_dir, status)
        return 1
    status.status, status.finished_at = "succeeded", time.time()
    write_status(job_dir, status)
    print(f"job {spec.job_id} succeeded: {status.artifact_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
