"""How many vLLM servers (and GPUs) fully finetuned agents need, for the config check and
`--dry-run`. With `finetune.local.full_finetune` each trained role is a whole model, so vLLM
cannot load it as an adapter: every distinct model a debate uses gets a server of its own
(harness.serve_pool starts and stops them).

Imports nothing of harness.config (which calls `full_serving_error` from its validator): the
functions take a RunConfig as they find it.
"""

from __future__ import annotations

from pathlib import Path

# Measured here (2 CPU cores shared with other work, vLLM 0.32's CPU build, float32), from the
# launch to /health answering 200, in <run>/serve/servers.jsonl of tests/test_serve_full_models.py:
# the spread is the machine's load. See docs/serving/full-models.md.
# On a GPU the weights load at the storage's read speed: one report on vLLM's tracker
# (github.com/vllm-project/vllm/issues/44881) loaded 21.82 GiB in ~18 s, i.e. ~1.3 GB/s, then
# spent ~43 s in torch.compile and more in warm-up; so a start is ~(GB / 1.3) s + about a minute.
GPU_READ_GBPS = 1.3
GPU_WARMUP_S = 60.0
CPU_STARTS = "the tiny test model 90-154 s alone, 70-196 s each for two at once; SmolLM2-135M 163 s alone, 218 s for two at once"


def serves_full_models(cfg) -> bool:
    """Whether the loop serves each finetuned agent as a whole model (one vLLM server each)."""
    return (cfg.endpoint.kind == "vllm" and cfg.finetune.provider == "local"
            and cfg.finetune.local.full_finetune)


def scores_base(cfg) -> bool:
    """Whether the test split's likelihood measures ask a server for the base model's
    log-probabilities (analysis.likelihood on the vLLM backend), so it is served beside the agents."""
    return cfg.analysis.likelihood and cfg.analysis.likelihood_backend in ("auto", "vllm")


def models_per_debate(cfg, agents: int, rounds: int, *, test: bool) -> int:
    """The most distinct models one debate can use: each agent's generator, and when there are
    later rounds its critic and the summarizer (mode summarize); on the test split the base model
    the likelihood measures compare against."""
    extra = set()  # the summarizer is the base model by default: one server for both
    if rounds > 1 and cfg.debate.mode == "summarize":
        extra.add(cfg.summarizer)
    if test and scores_base(cfg):
        extra.add(cfg.models.base)
    return agents * (2 if rounds > 1 else 1) + len(extra)


def servers_needed(cfg) -> int:
    """Servers up at once in the busiest iteration (after iteration 0, which serves the base alone;
    fewer at run time when roles share a model, e.g. critics kept as the base)."""
    if cfg.finetune.iterations == 0:
        return 1
    test = models_per_debate(cfg, cfg.test_agents, cfg.test_rounds, test=True)
    train = models_per_debate(cfg, cfg.debate.agents, cfg.debate.rounds, test=False) if cfg.finetune.iterations > 1 else 0
    return max(test, train)


def gpus_per_server(cfg) -> int:
    return cfg.serve.tensor_parallel_size * cfg.serve.data_parallel_size


def full_serving_error(cfg) -> str | None:
    """Why the config cannot serve fully finetuned agents, or None."""
    if not serves_full_models(cfg):
        return None
    serve = cfg.serve
    if not serve.manage:
        return ("finetune.local.full_finetune: each finetuned agent is a whole model that needs a vLLM server of its "
                "own, which the loop starts and stops per iteration; set serve.manage: true (and serve.devices to "
                "the GPUs they may use), or train adapters (full_finetune: false) to attach to your own server")
    if serve.replicas != 1:
        return ("serve.replicas: with finetune.local.full_finetune the loop starts one server per model; set "
                "serve.replicas: 1 (serve.data_parallel_size gives one model more GPUs)")
    need = servers_needed(cfg)
    if serve.port + need - 1 > 65535:
        return f"serve.port: {need} servers from port {serve.port} run past port 65535"
    per = gpus_per_server(cfg)
    if serve.runner == "subprocess" and serve.devices is not None and len(serve.devices) < need * per:
        return (f"serve.devices: fully finetuned agents need {need} vLLM servers at once (one per distinct model) x "
                f"{per} GPU(s) each = {need * per} GPUs, but {len(serve.devices)} are listed ({serve.devices}); "
                f"list {need * per} GPUs, lower debate.agents or serve.tensor_parallel_size"
                f"{', set analysis.likelihood: false (the base model is then not served beside the agents)' if scores_base(cfg) else ''}"
                f", or train adapters "
                f"(finetune.local.full_finetune: false), which one server loads at run time")
    return None


def _weights_gb(model: str | None) -> float | None:
    """Size of a local model folder's weights, in GB; None when not a local folder."""
    if not model:
        return None
    try:
        from harness.models import resolve

        path = Path(resolve(model)) if model.startswith("harness:") else Path(model)
    except Exception:  # an unknown harness: name, a missing cache: the size is just not known
        return None
    if not path.is_dir():
        return None
    files = [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return sum(f.stat().st_size for f in files) / 1e9 if files else None


def serving_plan_note(cfg) -> str | None:
    """`--dry-run`'s line on the servers fully finetuned agents need; None on other paths."""
    if not serves_full_models(cfg):
        return None
    need, per = servers_needed(cfg), gpus_per_server(cfg)
    if cfg.finetune.iterations == 0:
        return f"serving: finetune.iterations is 0, so only the base model is served (1 server, {per} GPU(s))"
    size = _weights_gb(cfg.serve.model)
    weights = f"{size:.2f} GB of weights each" if size is not None else "weights of the base model's size each"
    gpu = (f"~{size / GPU_READ_GBPS + GPU_WARMUP_S:.0f} s" if size is not None else
           f"~(GB of weights / {GPU_READ_GBPS}) s + ~{GPU_WARMUP_S:.0f} s, e.g. ~{14.5 / GPU_READ_GBPS + GPU_WARMUP_S:.0f} s "
           f"for a 7B model in bfloat16 (14.5 GB)")
    where = ("Ray places each server's GPUs" if cfg.serve.runner == "ray" else
             f"serve.devices lists {len(cfg.serve.devices)}" if cfg.serve.devices is not None else
             "serve.devices is not set: every server sees all of this machine's GPUs (set it on a GPU machine)")
    starts = 1 + need * cfg.finetune.iterations
    later = "iteration 1" if cfg.finetune.iterations == 1 else f"iterations 1..{cfg.finetune.iterations}"
    return (f"serving fully finetuned agents: iteration 0 serves the base model (1 server, {per} GPU(s)); "
            f"{later} need{'s' if cfg.finetune.iterations == 1 else ''} up to {need} vLLM servers at once ({need * per} GPUs, "
            f"{per} per server; {where}), {weights}, started before each iteration's debates and stopped before "
            f"its finetuning: about {starts} server starts in all. A start takes the time to read the weights from "
            f"disk plus the engine's warm-up (measured on 2 CPU cores here: {CPU_STARTS}; on a GPU from local disk "
            f"{gpu}, after one published vLLM load rate); each start's time is recorded in <run>/serve/servers.jsonl")
