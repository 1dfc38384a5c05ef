"""GPU estimates on paper: memory per GPU and hours per iteration of the three ways to train the
2N models of open-model multiagent finetuning, and of serving them.

  (a) LoRA, one process per adapter (`per_job`): 2N processes, each loading the base model, one GPU each;
  (b) LoRA resident: one process, the base loaded once, the 2N adapters time-shared on one GPU;
  (c) full finetuning, each model sharded with FSDP over k GPUs (mixed-precision AdamW).
Serving: LoRA adapters on vLLM servers of the base model (loaded once per run), or, for (c), one
vLLM server per whole model (2N, plus the base as summarizer), restarted every iteration.

Pure functions on pydantic models; no torch. Every number it rests on is printed with its source
under the table; docs/scaling.md derives the formulas. `python -m harness.scaling --model
mistral-7b --gpus 8 --gpu-memory-gb 80` prints the table (harness.scaling_report); `--dry-run` of
a local-finetuning vLLM run prints it for its own config.
"""

from __future__ import annotations

import heapq
import json
import math
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

GB = 1e9  # memory in decimal gigabytes, as GPU data sheets quote it

# Peak dense bf16 tensor-core TFLOPS (without sparsity): NVIDIA data sheets,
# https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM 989), https://www.nvidia.com/en-us/data-center/h200/
# (the same compute as H100 SXM), https://www.nvidia.com/en-us/data-center/a100/ (312).
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0, "a100": 312.0}
# Model FLOPs utilization: the Llama 3 paper reports 38-43% bf16 MFU on H100s (Table 4,
# https://arxiv.org/abs/2407.21783); PyTorch and IBM report 57% for a 7B model with FSDP on A100s
# (https://pytorch.org/blog/maximizing-training-throughput/). A short finetune with padded, variable-length
# MATH examples is less tuned than pretraining: the lower figure, 0.40, applied here to the FLOPs
# the GPU runs (activation checkpointing's recomputed forward included).
MFU = 0.40
# vLLM decode throughput of an 8B bf16 model on one GPU at saturating concurrency. Red Hat's
# MLPerf Inference v5.1 run: 5,777 tokens/s offline for Llama-3.1-8B in FP8 with vLLM on one H100
# (https://www.redhat.com/en/blog/efficient-and-reproducible-llm-inference-red-hat-mlperf-inference-v51-results);
# decode is memory-bound and bf16 weights are twice FP8's bytes: half, 2,900. A100: half an H100
# (Lambda's vLLM benchmark, https://github.com/LambdaLabsML/vllm-benchmark: "H100 ~2x better throughput").
SERVE_TOKENS_S_8B = {"h100": 2900.0, "h200": 2900.0, "a100": 1450.0}
SERVE_REF_PARAMS = 8.03e9
LORA_SERVE_FACTOR = 0.8  # assumption: multi-LoRA kernels cost ~20% of decode throughput
# Assumptions, not measured on GPUs here: a process start (imports, CUDA init) plus reading the
# weights at 2 GB/s; a vLLM server's start adds memory profiling and CUDA-graph capture.
PROCESS_START_S = 30.0
SERVER_START_S = 60.0
DISK_GB_S = 2.0
SAVE_GB_S = 1.0  # writing a finetuned whole model (bf16) to disk
HEADROOM = 0.9  # usable share of a GPU's memory (CUDA context, allocator fragmentation, NCCL buffers)
QUESTION_TOKENS = 150  # a MATH question in its prompt template (harness.plan measures the real text)
# H3's resident trainer against 2N processes, measured on CPU by benchmarks/multi_adapter.py. Until
# that file exists: the targets (<= 0.5x the wall time, <= 1.5x one job's peak memory).
RESULT_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "multi-adapter" / "result.json"
PLACEHOLDER_WALL_RATIO = 0.5
PLACEHOLDER_MEMORY_RATIO = 1.5


class ModelShape(BaseModel):
    """A decoder-only transformer's sizes (config.json's names), enough to count its parameters."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    tied: bool = False  # input and output embeddings shared

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim  # q, o; k, v
        return attention + 3 * self.hidden * self.intermediate + 2 * self.hidden  # gated MLP, 2 norms

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def lora_params(self, r: int) -> int:
        """LoRA on every linear layer ("all-linear"): r x (in + out) per layer of q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return self.layers * r * (2 * h + 2 * (h + kv) + 2 * h + 3 * (h + i))


# The paper's models and this harness's test model, from their config.json on the hub.
KNOWN_MODELS = {
    "mistral-7b": ModelShape(name="Mistral-7B", hidden=4096, layers=32, intermediate=14336, vocab=32000,
                             heads=32, kv_heads=8),
    "llama-3-8b": ModelShape(name="Llama-3-8B", hidden=4096, layers=32, intermediate=14336, vocab=128256,
                             heads=32, kv_heads=8),
    "phi-3-mini": ModelShape(name="Phi-3-mini", hidden=3072, layers=32, intermediate=8192, vocab=32064,
                             heads=32, kv_heads=32),
    "smollm2-135m": ModelShape(name="SmolLM2-135M", hidden=576, layers=30, intermediate=1536, vocab=49152,
                               heads=9, kv_heads=3, tied=True),
}
_ALIASES = {"mistral-7b": "mistral-7b", "llama-3-8b": "llama-3-8b", "llama-3.1-8b": "llama-3-8b",
            "llama3-8b": "llama-3-8b", "phi-3-mini": "phi-3-mini", "smollm2-135m": "smollm2-135m",
            "harness:smollm2": "smollm2-135m"}


def model_shape(model: str) -> ModelShape | None:
    """The shape of `model`: read from its config.json when it is a local folder (or a cached
    `harness:` model), else looked up by name among the paper's models; None when unknown."""
    folder = Path(model).expanduser()
    if model.startswith("harness:"):
        from harness.models import model_dir

        folder = model_dir(model.split(":", 1)[1])
    if (folder / "config.json").is_file():
        try:
            c = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            return ModelShape(name=folder.name, hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                              intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                              heads=c["num_attention_heads"],
                              kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                              tied=bool(c.get("tie_word_embeddings", False)))
        except (OSError, ValueError, KeyError, ValidationError):
            pass  # not a transformer config we can read: try the name
    low = model.lower()
    for alias, key in sorted(_ALIASES.items(), key=lambda kv: -len(kv[0])):
        if alias in low:
            return KNOWN_MODELS[key]
    return None


class Hardware(BaseModel):
    gpus: int
    gpu_memory_gb: float
    gpu: Literal["h100", "h200", "a100"] = "h100"
    mfu: float = MFU
    # Memory a co-resident vLLM server holds on a training GPU (LoRA runs keep it up while training).
    serve_share: float = 0.0
    # As configured (--dry-run): jobs at once (finetune.local.max_parallel_jobs) and vLLM
    # servers of the base (serve.replicas); None: one per GPU.
    parallel_jobs: int | None = None
    lora_servers: int | None = None

    @property
    def flops(self) -> float:
        return PEAK_TFLOPS[self.gpu] * 1e12 * self.mfu


class Workload(BaseModel):
    """One iteration's work: the debates' generated tokens and the training jobs' tokens."""

    agents: int
    decode_tokens: int  # generated by both splits' debates
    job_tokens: list[int]  # tokens each training job trains on, all epochs
    micro_batch: int  # sequences per GPU per step (activation memory)
    max_length: int
    lora_r: int
    summarizer_model: bool  # summarize mode: the base model summarizes (one more model to serve in full FT)


class ResidentRatios(BaseModel):
    wall_ratio: float
    memory_ratio: float
    measured: bool
    source: str


def resident_ratios(path: Path = RESULT_PATH) -> ResidentRatios:
    """H3's CPU measurement of the resident trainer against 2N processes, or the placeholder."""
    placeholder = "PLACEHOLDER: no benchmarks/results/multi-adapter/result.json yet"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return ResidentRatios(wall_ratio=float(data["wall_ratio"]), memory_ratio=float(data["memory_ratio_vs_one_job"]),
                              measured=True, source=f"measured on CPU ({path.name} of benchmarks/multi_adapter.py)")
    except OSError:
        pass
    except (ValueError, KeyError, TypeError):
        placeholder = (f"PLACEHOLDER: {path.name} holds no numeric wall_ratio and memory_ratio_vs_one_job")
    return ResidentRatios(wall_ratio=PLACEHOLDER_WALL_RATIO, memory_ratio=PLACEHOLDER_MEMORY_RATIO, measured=False,
                          source=f"{placeholder}; the issue's targets, not a measurement")


# ----------------------------------------------------------------------------- formulas

def full_ft_state_bytes(params: float, shards: int = 1) -> float:
    """Mixed-precision AdamW: bf16 weights (2) + bf16 gradients (2) + fp32 master weights, first
    and second moments (12) = 16 bytes per parameter (ZeRO, https://arxiv.org/abs/1910.02054),
    divided over the FSDP shards."""
    return 16 * params / shards


def lora_state_bytes(params: float, trainable: float) -> float:
    """The frozen base in bf16 (2 bytes per parameter) + 16 bytes per trainable adapter parameter."""
    return 2 * params + 16 * trainable


def activation_bytes(shape: ModelShape, micro_batch: int, seq: int, checkpointing: bool = True) -> float:
    """Activations of one step: 34 s b h bytes per layer in 16-bit with flash attention (Korthikanti
    et al., https://arxiv.org/abs/2205.05198, without the s^2 attention term); with activation
    checkpointing (the trainer's default on GPU) each layer keeps only its 2 s b h input, and one
    layer is recomputed at a time; plus the logits and their gradient in fp32 (8 s b V)."""
    sbh = seq * micro_batch * shape.hidden
    per_layer = 34 * sbh
    kept = shape.layers * 2 * sbh + per_layer if checkpointing else shape.layers * per_layer
    return kept + 8 * seq * micro_batch * shape.vocab


def train_flops(tokens: float, params: float, trainable: float | None = None, recompute: bool = False) -> float:
    """Model FLOPs: 6 per parameter per token for full training (2 forward + 4 backward; Kaplan et
    al., https://arxiv.org/abs/2001.08361). LoRA: the frozen base still runs forward (2) and
    back-propagates to its inputs (2) but computes no weight gradients: 4 P + 6 P_trainable.
    `recompute`: the FLOPs the GPU runs with activation checkpointing, which repeats the forward (+2 P)."""
    model = 6 * params if trainable is None else 4 * params + 6 * trainable
    return tokens * (model + (2 * params if recompute else 0))


def load_seconds(params: float) -> float:
    return PROCESS_START_S + 2 * params / GB / DISK_GB_S


def serve_tokens_per_s(params: float, hw: Hardware, lora: bool) -> float:
    """Decode is memory-bound: throughput scales with 1 / model size (capped at 2x the 8B figure,
    where the scheduler, not the weights, limits a small model)."""
    rate = SERVE_TOKENS_S_8B[hw.gpu] * min(2.0, SERVE_REF_PARAMS / params)
    return rate * (LORA_SERVE_FACTOR if lora else 1.0)


def _makespan(durations: list[float], slots: int) -> float:
    """Jobs started longest first on `slots` parallel slots, each on the least loaded slot."""
    loads = [0.0] * max(1, slots)
    for d in sorted(durations, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + d)
    return max(loads)


# ----------------------------------------------------------------------------- the three ways

class ModeEstimate(BaseModel):
    key: Literal["per_job", "resident", "full"]
    label: str
    gpus_per_job: int
    jobs_at_once: int
    train_memory_gb: float  # per training GPU
    fits: bool
    train_hours: float
    servers: str  # how the models are served
    serve_memory_gb: float  # per serving GPU: weights (the KV cache takes what vLLM is given)
    serve_fits: bool
    debate_hours: float
    load_hours: float  # servers (re)started for the iteration
    note: str = ""

    @property
    def iteration_hours(self) -> float:
        return self.train_hours + self.debate_hours + self.load_hours


def estimate(shape: ModelShape, hw: Hardware, wl: Workload, ratios: ResidentRatios,
             full_shards: int | None = None, lora_processes: int = 1) -> list[ModeEstimate]:
    """The three ways. full_shards: GPUs per full-finetuning job (None: the fewest that fit);
    lora_processes: data-parallel processes (GPUs) per LoRA job of (a), each with the whole model."""
    p = shape.params
    t = shape.lora_params(wl.lora_r)
    act = activation_bytes(shape, wl.micro_batch, wl.max_length)
    usable = hw.gpu_memory_gb * GB * HEADROOM
    lora_usable = usable - hw.serve_share * hw.gpu_memory_gb * GB
    lora_job = lora_state_bytes(p, t) + act
    # The trainer checkpoints activations on GPU: its GPUs run the forward twice.
    lora_compute = [train_flops(n, p, t, recompute=True) / hw.flops for n in wl.job_tokens]
    jobs = len(wl.job_tokens)

    # LoRA serving: the base (+ adapters) on each GPU; agents are pinned to servers (agent n ->
    # server n mod K), so at most `agents` servers decode at once.
    lora_servers = min(hw.lora_servers or hw.gpus, wl.agents)
    lora_debate = wl.decode_tokens / (serve_tokens_per_s(p, hw, lora=True) * lora_servers) / 3600
    lora_serve_mem = (2 * p + 2 * t * jobs) / GB
    # A server sharing the training GPUs gets serve.gpu_memory_utilization of it, weights and KV cache.
    serve_budget = hw.serve_share * hw.gpu_memory_gb * GB if hw.serve_share else usable
    lora_serving = dict(servers=f"{hw.lora_servers or hw.gpus} x base + {jobs} LoRA",
                        serve_memory_gb=lora_serve_mem, serve_fits=lora_serve_mem * GB < serve_budget,
                        debate_hours=lora_debate, load_hours=0.0)

    at_once = max(1, min(jobs, hw.parallel_jobs or hw.gpus, hw.gpus // lora_processes))
    per_job = ModeEstimate(key="per_job", label="(a) LoRA, a process per adapter", gpus_per_job=lora_processes,
                           jobs_at_once=at_once, train_memory_gb=lora_job / GB, fits=lora_job <= lora_usable,
                           train_hours=_makespan([load_seconds(p) + c / lora_processes for c in lora_compute],
                                                 at_once) / 3600,
                           note=f"{jobs} processes, {at_once} at once, each loading the base model "
                                f"({2 * p / GB:.1f} GB); "
                                f"vLLM: the base loaded once per run, the adapters added each iteration",
                           **lora_serving)

    serial = sum(load_seconds(p) + c for c in lora_compute)
    floor = load_seconds(p) + sum(lora_compute)
    resident_mem = ratios.memory_ratio * lora_job
    resident = ModeEstimate(key="resident", label="(b) LoRA resident, one process", gpus_per_job=1, jobs_at_once=1,
                            train_memory_gb=resident_mem / GB, fits=resident_mem <= lora_usable,
                            train_hours=max(ratios.wall_ratio * serial, floor) / 3600,
                            note=f"wall {ratios.wall_ratio:g}x and memory {ratios.memory_ratio:g}x of (a) on one "
                                 f"GPU ({'measured on CPU' if ratios.measured else 'placeholder'}); never below "
                                 f"one load + the {jobs} jobs' compute", **lora_serving)

    full_act = act + 2 * 2 * shape.layer_params  # + FSDP's gathered bf16 layer and its prefetched neighbour
    k = full_shards or next((s for s in _shard_choices(hw.gpus) if full_ft_state_bytes(p, s) + full_act <= usable),
                            hw.gpus)
    full_mem = full_ft_state_bytes(p, k) + full_act
    slots = max(1, min(hw.gpus // k, hw.parallel_jobs or hw.gpus))
    save = 2 * p / GB / SAVE_GB_S
    full_train = _makespan([load_seconds(p) + train_flops(n, p, recompute=True) / (hw.flops * k) + save
                            for n in wl.job_tokens], slots) / 3600
    models = jobs + (1 if wl.summarizer_model else 0)
    # Tensor parallel until the weights take at most half of each GPU (the rest: KV cache).
    tp = next((s for s in _shard_choices(64) if 2 * p <= 0.5 * usable * s), 64)
    resident_servers = hw.gpus // tp
    start = SERVER_START_S + 2 * p / GB / DISK_GB_S
    if resident_servers >= models:
        loads, how = start, f"{models} whole, TP {tp}"
        serve_note = f"{models} vLLM servers, one per model, started in parallel each iteration"
    else:  # too few GPUs: servers swapped between models, per debate split
        loads = 2 * math.ceil(models / max(1, resident_servers)) * start
        how = f"{max(1, resident_servers)} swapped, TP {tp}"
        serve_note = (f"too few GPUs for {models} servers: {max(1, resident_servers)} swapped between the models "
                      f"(slower)")
    busy = max(1, min(wl.agents, resident_servers))
    full = ModeEstimate(key="full", label=f"(c) full FT, FSDP over {k}", gpus_per_job=k,
                        jobs_at_once=min(jobs, slots), train_memory_gb=full_mem / GB,
                        fits=full_mem <= usable, train_hours=full_train, servers=how,
                        serve_memory_gb=2 * p / tp / GB, serve_fits=resident_servers >= 1,
                        debate_hours=wl.decode_tokens / (serve_tokens_per_s(p, hw, lora=False) * busy) / 3600,
                        load_hours=loads / 3600,
                        note=f"16 bytes/param AdamW states sharded over {k} GPU(s); each job saves a "
                             f"{2 * p / GB:.1f} GB model; {serve_note}"
                             + (" (the base model is the summarizer)" if wl.summarizer_model else ""))
    return [per_job, resident, full]


def _shard_choices(gpus: int) -> list[int]:
    return [s for s in (1, 2, 4, 8, 16, 32, 64) if s <= gpus] or [1]


# ----------------------------------------------------------------------------- from a run config

def workload(cfg) -> Workload:
    """One iteration of `cfg` (a RunConfig), with harness.plan's token assumptions: an answer of
    ANSWER_TOKENS (capped by sampling.max_tokens), a summary of SUMMARY_TOKENS, AGREE_SHARE of
    the train problems giving each model an example."""
    from harness.plan import AGREE_SHARE, ANSWER_TOKENS, SUMMARY_TOKENS

    n, m = cfg.debate.agents, cfg.debate.rounds
    answer = min(ANSWER_TOKENS, cfg.sampling.max_tokens)
    summarize = cfg.debate.mode == "summarize"

    def decode(agents: int, rounds: int) -> int:
        return agents * (answer + (rounds - 1) * (answer + (SUMMARY_TOKENS if summarize else 0)))

    local, ft = cfg.finetune.local, cfg.finetune
    critics = m > 1 and ft.train_critics
    examples = int(cfg.task.n_train * AGREE_SHARE)
    gen = min(QUESTION_TOKENS + answer, local.max_length)
    context = SUMMARY_TOKENS + 60 if summarize else (n - 1) * (answer + 5) + 60
    critic = min(gen + (m - 1) * (context + answer), local.max_length)
    epochs = ft.hyperparameters.n_epochs
    if ft.single_model:
        jobs = [epochs * n * examples * (gen + (critic if critics else 0))]
    else:
        jobs = [epochs * examples * gen] * n + ([epochs * examples * critic] * n if critics else [])
    # hyperparameters.batch_size is each process's batch (gradient accumulation, where the
    # config has it, adds steps, not memory): the sequences one GPU holds activations for.
    micro = ft.hyperparameters.batch_size
    return Workload(agents=n, decode_tokens=cfg.task.n_train * decode(n, m)
                    + cfg.task.n_test * decode(cfg.test_agents, cfg.test_rounds),
                    job_tokens=jobs, micro_batch=micro, max_length=local.max_length, lora_r=local.r,
                    summarizer_model=summarize and m > 1 and cfg.models.summarizer is None)


def hardware(cfg, gpus: int | None = None, gpu_memory_gb: float | None = None) -> Hardware:
    """The `hardware` section (harness/scaling_settings.py) where the config has one, else its defaults."""
    from harness.scaling_settings import HardwareSettings

    hw = getattr(cfg, "hardware", None) or HardwareSettings()
    listed = max(len(cfg.finetune.local.devices or []), len(cfg.serve.devices or []))
    # A managed LoRA server stays up while the adapters train; on the training GPUs unless both are listed apart.
    apart = (cfg.finetune.local.devices and cfg.serve.devices
             and not {str(d) for d in cfg.finetune.local.devices} & {str(d) for d in cfg.serve.devices})
    share = cfg.serve.gpu_memory_utilization if cfg.serve.manage and not apart else 0.0
    return Hardware(gpus=gpus or hw.gpus or listed or 1, gpu_memory_gb=gpu_memory_gb or hw.gpu_memory_gb,
                    gpu=hw.gpu, mfu=hw.mfu or MFU, serve_share=share)


def configured_hardware(cfg) -> Hardware:
    """`--dry-run`: the config's GPUs, and its LoRA jobs at once and vLLM servers as configured."""
    hw = hardware(cfg)
    local = cfg.finetune.local
    at_once = local.max_parallel_jobs
    if local.devices and not local.share_devices:
        at_once = min(at_once, len(local.devices))
    servers = cfg.serve.replicas if cfg.serve.manage else max(1, len(cfg.serve.base_urls))
    return hw.model_copy(update={"parallel_jobs": min(at_once, hw.gpus), "lora_servers": servers})


def configured_mode(cfg, gpus: int) -> str:
    """Which of the three ways `cfg` trains on `gpus` GPUs: full finetuning, or LoRA by
    finetune.local.trainer (auto: resident on one GPU, one process per adapter on several)."""
    local = cfg.finetune.local
    if local.full_finetune:
        return "full"
    return "resident" if local.resident_with(gpus) else "per_job"


def main(argv: list[str] | None = None) -> int:
    from harness.scaling_report import main as report_main  # rich tables: harness.scaling_report

    return report_main(argv)


if __name__ == "__main__":
    sys.exit(main())
