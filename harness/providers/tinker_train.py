"""One Tinker training job, run in its own process (in an environment with the `tinker` SDK):

    python -m harness.providers.tinker_train --job-dir DIR

Tinker trains through a client-side loop, so a "job" is this loop: read DIR/spec.json (a
`TinkerJobSpec`), tokenize the chat examples with the base model's chat template (per-token
weights: 1 on the assistant turns of weight 1, 0 on prompts and on weight-0 turns), then per
batch `forward_backward` (cross-entropy with those weights) and `optim_step`, a training
checkpoint (`save_state`) every `checkpoint_every` steps, and at the end the final state (which
the agent's next-iteration job starts from), sampler weights, and their archive downloaded and
unpacked as a PEFT adapter in DIR/adapter for vLLM.

DIR/tinker.json (`TinkerJobState`) records the service's ids and the last checkpoint after each
one is saved; a restarted job continues from it (weights and Adam state), so no step is applied
twice. DIR/status.json and DIR/progress.jsonl are shaped as the local provider's (one progress
line per step: loss per weighted token, weighted/total tokens, and the loss the service reported
on weight-0 tokens, which must be 0).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import socket
import sys
import tarfile
import time
import traceback
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from harness.fileio import JsonlAppender, write_model
from harness.providers.local_train import JobFile, JobSpec, read_status, write_status
from harness.providers.weighted_examples import IGNORE, read_examples

STATE = "tinker.json"


class TinkerJobSpec(JobSpec):
    """JobSpec's fields (the local provider's machinery reads them) plus the service's."""

    base_url: str | None = None
    api_key_env: str = "TINKER_API_KEY"
    service_model: str  # the base model as the service names it
    tokenizer: str  # folder or hub id of the base model's tokenizer and chat template
    init_state: str | None = None  # tinker://.../weights/... of the previous iteration's job (start_from: previous)
    checkpoint_every: int = 5
    pad_to: int | None = None
    request_timeout_s: float = 1800.0


class TinkerJobState(BaseModel):
    """DIR/tinker.json, written by the job after each checkpoint."""

    training_runs: list[str] = Field(default_factory=list)  # the service's training-run ids, first to last
    step: int = 0  # optimizer steps applied in `checkpoint`
    checkpoint: str | None = None  # tinker://<run>/weights/<name>: what a restarted job continues from
    final_state: str | None = None  # tinker path of the finished job's state (the next iteration starts there)
    sampler_path: str | None = None
    updated_at: float = Field(default_factory=time.time)


def read_state(job_dir: Path) -> TinkerJobState:
    path = job_dir / STATE
    if not path.exists():
        return TinkerJobState()
    return TinkerJobState.model_validate_json(path.read_text(encoding="utf-8"))


def write_state(job_dir: Path, state: TinkerJobState) -> None:
    state.updated_at = time.time()
    write_model(job_dir / STATE, state)


# ----------------------------------------------------------------------------- data

def datum_arrays(example: dict) -> tuple[list[int], list[int], list[float]]:
    """(model input, target tokens, per-token weights) of one tokenized example: the model reads
    tokens[:-1] and predicts tokens[1:]; a target's weight is 1 where its label is trained."""
    ids, labels = example["input_ids"], example["labels"]
    weights = [0.0 if label == IGNORE else 1.0 for label in labels[1:]]
    return ids[:-1], ids[1:], weights


def pad(arrays: tuple[list[int], list[int], list[float]], multiple: int | None,
        pad_id: int) -> tuple[list[int], list[int], list[float]]:
    """Weight-0 tokens after the text, up to a multiple of `multiple` (finetune.tinker.pad_to)."""
    inp, tgt, w = arrays
    if not multiple or len(inp) % multiple == 0:
        return arrays
    extra = multiple - len(inp) % multiple
    return inp + [pad_id] * extra, tgt + [pad_id] * extra, w + [0.0] * extra


def batches(n: int, batch_size: int, epochs: int, seed: int) -> list[list[int]]:
    """Example indices of every optimizer step: each epoch a seeded shuffle, cut into batches.
    Deterministic, so a restarted job knows which step comes next."""
    steps = []
    for epoch in range(epochs):
        order = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(order)
        steps += [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return steps


# ----------------------------------------------------------------------------- service errors

def explain(e: BaseException, spec: TinkerJobSpec) -> str:
    """The service's error with what to do about it."""
    name = type(e).__name__
    text = str(e)
    where = spec.base_url or "the hosted Tinker service"
    if name == "AuthenticationError" or " 401" in text or "Unauthorized" in text:
        return f"{where} refused the API key (${spec.api_key_env}): {text}; export a valid key in {spec.api_key_env}"
    if name == "PermissionDeniedError" or " 403" in text:
        return f"{where} denied the request: {text}; check the key's project and permissions"
    if name == "RateLimitError" or " 429" in text or "quota" in text.lower():
        return (f"{where}: quota or rate limit exhausted: {text}; wait or raise the quota, then resume the run "
                f"(the job continues from its last checkpoint)")
    if name in ("APIConnectionError", "APITimeoutError", "ConnectError") or isinstance(e, ConnectionError):
        return f"cannot reach {where}: {text}; check finetune.tinker.base_url and that the service is up"
    return f"{name}: {text}"


# ----------------------------------------------------------------------------- adapter

def _archive_bytes(service: Any, base_url: str | None, api_key: str, sampler_path: str) -> bytes:
    """The sampler checkpoint's archive. The SDK asks the service for a download URL; a
    skyrl-tx 0.3.0 server answers that route only under its own path shape
    (/training_runs/<run>/checkpoints/<name>/archive), so that is tried when the SDK's fails."""
    run, _, name = sampler_path.removeprefix("tinker://").partition("/")
    name = name.removeprefix("sampler_weights/")
    try:
        url = service.create_rest_client().get_checkpoint_archive_url_from_tinker_path(
            f"tinker://{run}/sampler_weights/{name}").result().url
    except Exception as first:  # noqa: BLE001 - the fallback below says what failed if it fails too
        if not base_url:
            raise
        url = f"{base_url}/api/v1/training_runs/{run}/checkpoints/{name}/archive"
        print(f"the SDK's archive lookup failed ({type(first).__name__}); downloading {url}", flush=True)
    request = urllib.request.Request(url, headers={"X-API-Key": api_key} if url.startswith(base_url or "\0") else {})
    with urllib.request.urlopen(request, timeout=600) as resp:
        return resp.read()


def unpack_adapter(archive: bytes, out: Path) -> Path:
    """Unpack a sampler archive into `out` as a PEFT adapter vLLM loads: the service writes
    adapter_config.json without `target_modules` (vLLM needs them), so they are filled in from
    the weights' names."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tmp, filter="data")
    config_path = tmp / "adapter_config.json"
    if not config_path.exists() or not (tmp / "adapter_model.safetensors").exists():
        raise RuntimeError(f"the sampler archive holds {sorted(p.name for p in tmp.iterdir())}, not a PEFT adapter")
    from safetensors import safe_open

    with safe_open(str(tmp / "adapter_model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
    modules = sorted({n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names if ".lora_" in n})
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if not config.get("target_modules"):
        config["target_modules"] = modules
    config["task_type"] = config.get("task_type") or "CAUSAL_LM"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ----------------------------------------------------------------------------- training

def train(spec: TinkerJobSpec, job_dir: Path, status: JobFile) -> JobFile:
    import tinker
    from tinker import types
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer)
    examples, status.dropped_examples = read_examples(Path(spec.training_file), tokenizer, spec.max_length)
    real_tokens = [len(ex["input_ids"]) - 1 for ex in examples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = [pad(datum_arrays(ex), spec.pad_to, pad_id) for ex in examples]
    plan = batches(len(data), spec.batch_size, spec.epochs, spec.seed)
    status.total_steps = len(plan)
    write_status(job_dir, status)
    weighted = sum(sum(w) for _, _, w in data)
    print(f"{len(data)} examples ({status.dropped_examples} dropped), {int(weighted)} weighted tokens, "
          f"{len(plan)} steps of up to {spec.batch_size}", flush=True)

    api_key = os.environ.get(spec.api_key_env) or ("tml-local" if spec.base_url else None)
    if api_key is None:
        raise RuntimeError(f"environment variable {spec.api_key_env} is not set; export your Tinker API key there")
    service = tinker.ServiceClient(base_url=spec.base_url, api_key=api_key)
    state = read_state(job_dir)
    if state.checkpoint:
        print(f"continuing from {state.checkpoint} (step {state.step})", flush=True)
        client = service.create_training_client_from_state_with_optimizer(state.checkpoint)
    elif spec.init_state:
        print(f"starting from the previous iteration's adapter {spec.init_state}", flush=True)
        client = service.create_training_client_from_state(spec.init_state)
    else:
        client = service.create_lora_training_client(
            base_model=spec.service_model, rank=spec.lora.r, seed=spec.seed, train_unembed=False,
            user_metadata={k: str(v) for k, v in spec.metadata.items()})
    state.training_runs.append(client.model_id)
    write_state(job_dir, state)

    progress = JsonlAppender(job_dir / "progress.jsonl")
    timeout = spec.request_timeout_s
    for step in range(state.step + 1, len(plan) + 1):
        batch = [data[i] for i in plan[step - 1]]
        tokens = sum(real_tokens[i] for i in plan[step - 1])
        datums = [types.Datum(model_input=types.ModelInput.from_ints(inp),
                              loss_fn_inputs={"target_tokens": tgt, "weights": w}) for inp, tgt, w in batch]
        lr = spec.learning_rate * (1 - (step - 1) / len(plan))  # linear decay, as the local provider's
        fb = client.forward_backward(datums, "cross_entropy")
        opt = client.optim_step(types.AdamParams(learning_rate=lr))
        out = fb.result(timeout=timeout)
        opt.result(timeout=timeout)
        loss_sum = masked = 0.0
        for (_, _, w), o in zip(batch, out.loss_fn_outputs):
            losses = o["elementwise_loss"].tolist()
            loss_sum += sum(x for x, wt in zip(losses, w) if wt > 0)
            masked += sum(abs(x) for x, wt in zip(losses, w) if wt == 0)
        n_weighted = sum(sum(w) for _, _, w in batch)
        loss = loss_sum / max(n_weighted, 1)
        if step % spec.checkpoint_every == 0 and step < len(plan):
            saved = client.save_state(f"step-{step}").result(timeout=timeout)
            state.step, state.checkpoint = step, saved.path
            write_state(job_dir, state)
        progress.append({"step": step, "loss": loss, "epoch": (step - 1) * spec.epochs // len(plan),
                         "learning_rate": lr, "weighted_tokens": int(n_weighted),
                         "tokens": tokens, "weight0_loss": masked,
                         "training_run": client.model_id, "time": time.time()})
        status.step, status.loss = step, loss
        write_status(job_dir, status)
    progress.close()

    final = client.save_state("final").result(timeout=timeout)
    sampler = client.save_weights_for_sampler("sampler-final").result(timeout=timeout)
    state.step, state.checkpoint, state.final_state, state.sampler_path = len(plan), final.path, final.path, sampler.path
    write_state(job_dir, state)
    adapter = unpack_adapter(_archive_bytes(service, spec.base_url, api_key, sampler.path), job_dir / "adapter")
    status.artifact_path = str(adapter)
    status.trained_tokens = sum(real_tokens) * spec.epochs
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run one Tinker training job described by DIR/spec.json.")
    parser.add_argument("--job-dir", type=Path, required=True)
    job_dir = parser.parse_args(argv).job_dir.resolve()
    status = read_status(job_dir)
    if status.status == "cancelled":
        print(f"job {job_dir.name} was cancelled before it started", flush=True)
        return 1
    status.status, status.pid, status.started_at = "running", os.getpid(), status.started_at or time.time()
    status.host, status.error, status.finished_at = socket.gethostname(), None, None
    write_status(job_dir, status)
    spec = TinkerJobSpec.model_validate_json((job_dir / "spec.json").read_text(encoding="utf-8"))
    try:
        status = train(spec, job_dir, status)
    except BaseException as e:  # noqa: BLE001 - every failure must land in status.json
        traceback.print_exc()
        sys.stdout.flush()
        status.status, status.finished_at = "failed", time.time()
        status.error = explain(e, spec)
        write_status(job_dir, status)
        return 1
    status.status, status.finished_at = "succeeded", time.time()
    write_status(job_dir, status)
    print(f"job {spec.job_id} succeeded: {status.artifact_path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
