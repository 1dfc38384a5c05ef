"""Run configuration: a pydantic model loaded from YAML, named presets, `--set` overrides.

A bad config fails here, before any call, with a message naming the file, the field and what
is allowed. Secrets never live in the config: it names the environment variable to read.
"""

from __future__ import annotations

import copy
import os
import re
import types
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.errors import ConfigError
from harness.providers.tinker_settings import TinkerSettings


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ArithmeticConfig(_Strict):
    """The arithmetic task's expressions: `terms` integers drawn from [low, high], joined by
    `operators` (one per gap, in order). The default is the paper's a+b*c+d-e*f over 0..29;
    fewer terms, a smaller range or only + and - give the easier rungs a small model needs."""

    terms: int = Field(6, ge=2, le=12)
    low: int = Field(0, ge=0)
    high: int = Field(29, ge=0)
    # One of + - * per gap between terms, e.g. "+*+-*" (the paper's); with random_operators, the
    # set each gap's operator is drawn from (per problem, seeded), e.g. "+-".
    operators: str = "+*+-*"
    random_operators: bool = False

    @model_validator(mode="after")
    def _check(self) -> "ArithmeticConfig":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators {self.operators!r}: use only + - * (e.g. '+*+-*')")
        if not self.random_operators and len(self.operators) != self.terms - 1:
            raise ValueError(f"operators {self.operators!r} has {len(self.operators)} operator(s) but {self.terms} "
                             f"terms need {self.terms - 1}; give one per gap, or set random_operators: true to "
                             f"draw each from the set")
        return self

    @property
    def is_paper_form(self) -> bool:
        return self == ArithmeticConfig()


class TaskConfig(_Strict):
    name: Literal["arithmetic", "gsm8k", "math", "mmlu"] = "arithmetic"
    # Hub id or local JSONL/Parquet path for the training problems; None: the task's default.
    source: str | None = None
    # Separate source for the test problems; None: the task's default (or a disjoint split of `source`).
    test_source: str | None = None
    n_train: int = Field(500, ge=0)
    n_test: int = Field(500, ge=0)
    seed: int = 0
    # MATH only: difficulty levels kept (the paper uses 1-3).
    levels: list[int] = Field(default_factory=lambda: [1, 2, 3])
    # A directory with the user's own prompt templates; files there override the prompt set's.
    prompts_dir: str | None = None
    # The arithmetic task's difficulty (number of terms, operand range, operators).
    arithmetic: ArithmeticConfig = Field(default_factory=ArithmeticConfig)
    # "harness": prompts/<task>/ (numbered others, in order); "authors": the paper's authors' own
    # prompts word for word, for arithmetic, gsm8k and math (anonymous others, shuffled, at most
    # 5). See harness/prompts.py and prompts/authors/README.md.
    prompt_set: Literal["harness", "authors"] = "harness"


class SimulatorConfig(_Strict):
    """Knobs of the built-in simulated models (a test double; its numbers are labelled simulated)."""

    seed: int = 0
    skill: float = Field(0.55, ge=0, le=1)  # chance the base model answers correctly
    persuadability: float = Field(0.5, ge=0, le=1)  # chance to adopt the others' majority in later rounds
    latency_ms: float = Field(0.0, ge=0)  # mean injected latency per chat call
    latency_jitter_ms: float = Field(0.0, ge=0)
    rpm_limit: int | None = Field(None, ge=1)  # requests per minute before 429s
    tpm_limit: int | None = Field(None, ge=1)  # tokens per minute before 429s
    error_rate: float = Field(0.0, ge=0, le=1)  # share of calls answered with HTTP 500
    timeout_rate: float = Field(0.0, ge=0, le=1)  # share of calls that hang past the client timeout
    malformed_rate: float = Field(0.0, ge=0, le=1)  # share of answers without a parseable final answer
    # Context window in prompt tokens: longer prompts get a 400 context_length_exceeded, as from
    # OpenAI or a vLLM server with a small max_model_len. None: unlimited.
    context_tokens: int | None = Field(None, ge=1)
    job_seconds: float = Field(1.0, ge=0)  # simulated duration of a fine-tuning job
    job_failure_rate: float = Field(0.0, ge=0, le=1)
    # Share of jobs their (simulated) owner pauses as they start running; they stay paused until
    # resumed through POST /v1/fine_tuning/jobs/{id}/resume.
    job_pause_rate: float = Field(0.0, ge=0, le=1)


class EndpointConfig(_Strict):
    """Where chat calls go. `simulator` starts the built-in server in-process on 127.0.0.1."""

    kind: Literal["simulator", "openai", "vllm"] = "simulator"
    base_url: str | None = None  # required for vllm unless the loop starts the server itself
    api_key_env: str | None = "OPENAI_API_KEY"  # the environment variable holding the key
    concurrency: int = Field(64, ge=1)  # calls in flight at once
    timeout_s: float = Field(120.0, gt=0)  # per call
    max_retries: int = Field(6, ge=0)  # retries of real errors (5xx, timeouts, malformed answers); 429s are paced
    # Client-side budget, for a limit the server does not announce in x-ratelimit-* headers (or one
    # to stay below, e.g. to leave room for other users of the key). None: only the server's limits.
    rpm_limit: int | None = Field(None, ge=1)  # requests per minute
    tpm_limit: int | None = Field(None, ge=1)  # tokens per minute (prompt estimate + max_tokens)
    # A rate limit (429) is waited out, not counted as a failure; the run stops only after no call
    # has got through for this long.
    rate_limit_wait_s: float = Field(600.0, gt=0)
    # Models that accept only their default sampling (OpenAI's reasoning models): for them, on
    # OpenAI endpoints, temperature and top_p are not sent. Shell-style patterns, matched against
    # the model name (for a fine-tune ft:<base>:..., against <base>).
    reasoning_models: list[str] = Field(default_factory=lambda: ["o1*", "o3*", "o4*", "gpt-5*"])
    # The name of the output-length limit in chat requests: OpenAI's current name (vLLM accepts it
    # too); "max_tokens" only for an older OpenAI-compatible server that ignores the new name.
    max_tokens_param: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)

    def api_key(self) -> str:
        if self.kind == "simulator":
            return "simulated-key"
        if self.api_key_env is None:
            return "EMPTY"
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.kind == "vllm":
            return "EMPTY"
        raise ConfigError(
            f"endpoint.api_key_env: environment variable {self.api_key_env} is not set; "
            f"export it (the key is never written to the config or the run directory)"
        )


class ModelsConfig(_Strict):
    base: str = "sim-base"  # every agent's generator and critic at iteration 0
    summarizer: str | None = None  # None: the base model (as the authors' code does)


class SamplingConfig(_Strict):
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    # New tokens per reply. 2048, as the authors' code allows; a reply cut off here does not vote
    # (the results table shows the truncation rate). Presets for small models lower it.
    max_tokens: int = Field(2048, ge=1)
    # Send a per-sample seed derived from run seed and sample identity (reproducible samples).
    seeded: bool = True
    # Server-specific sampling parameters (vLLM: top_k, min_p, ...); sent only to vLLM endpoints.
    extra_body: dict[str, Any] = Field(default_factory=dict)


class DebateConfig(_Strict):
    agents: int = Field(3, ge=1)
    rounds: int = Field(2, ge=1)
    mode: Literal["summarize", "concatenate"] = "summarize"


class GradingConfig(_Strict):
    timeout_s: float = Field(5.0, gt=0)  # per equivalence check; a pathological answer counts as not equal


class BudgetConfig(_Strict):
    max_cost_usd: float | None = Field(None, gt=0)  # stop cleanly (resumable) before passing this


# The OpenAI fine-tuning API's ranges, from its official OpenAPI spec v2.3.0 (openai/openai-openapi,
# openapi.yaml: FineTuneSupervisedHyperparameters and CreateFineTuningJobRequest.seed). A run with
# the openai provider is checked against them at load time, before any call or upload.
OPENAI_FT_RANGES: dict[str, tuple[float, float | None]] = {
    "finetune.hyperparameters.n_epochs": (1, 50),
    "finetune.hyperparameters.batch_size": (1, 256),
    "finetune.hyperparameters.learning_rate_multiplier": (0, None),  # exclusive minimum 0, no maximum
    "seed": (0, 2**31 - 1),  # sent as the job's seed
}


def openai_ft_range_error(hp: "Hyperparameters", seed: int | None) -> str | None:
    """What in these hyperparameters or this seed the OpenAI fine-tuning API would refuse, or None."""
    values = {"finetune.hyperparameters.n_epochs": hp.n_epochs, "finetune.hyperparameters.batch_size": hp.batch_size,
              "finetune.hyperparameters.learning_rate_multiplier": hp.learning_rate_multiplier, "seed": seed}
    for name, (lo, hi) in OPENAI_FT_RANGES.items():
        v = values[name]
        if v is None:
            continue
        exclusive = name.endswith("learning_rate_multiplier")
        if v < lo or (exclusive and v == lo) or (hi is not None and v > hi):
            allowed = f"between {lo} and {hi}" if hi is not None else f"greater than {lo}"
            return f"{name} = {v}: OpenAI's fine-tuning API accepts values {allowed}"
    return None


class Hyperparameters(_Strict):
    # The paper's defaults.
    n_epochs: int = Field(2, ge=1)
    batch_size: int = Field(1, ge=1)
    learning_rate_multiplier: float = Field(1.0, gt=0)


class RayJobsConfig(_Strict):
    """`finetune.local.runner: ray`: each job is submitted to a Ray cluster through Ray's Job
    Submission API (entrypoint `python -m harness.providers.local_train --job-dir DIR`)."""

    # The cluster's dashboard (Job API) address, e.g. http://head:8265. None: Ray's own lookup
    # (RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or a cluster started on this machine). Those two
    # environment variables, when set, win over this field (Ray's rule).
    address: str | None = None
    num_gpus_per_job: float = Field(1, ge=0)  # entrypoint_num_gpus: Ray sets CUDA_VISIBLE_DEVICES
    num_cpus_per_job: float = Field(1, ge=0)  # entrypoint_num_cpus
    # Ray runtime_env of every job (env_vars, py_modules, pip, ...); merged over the harness's own
    # env_vars (PYTHONPATH to this checkout, PYTHONUNBUFFERED, TOKENIZERS_PARALLELISM).
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # Refuse to submit when no node of the cluster has num_gpus/num_cpus_per_job (the job would
    # wait forever). False for an autoscaling cluster whose nodes appear on demand.
    check_resources: bool = True


class LocalFinetuneConfig(_Strict):
    """The `local` provider: TRL SFT with a PEFT LoRA adapter (or a full finetune), one
    process per job, started by a runner (a subprocess here, or a Ray job). Epochs and batch
    size come from `finetune.hyperparameters`."""

    base_model_path: str | None = None  # weights to train (path or hub id); None: serve.model
    r: int = Field(8, ge=1)  # LoRA rank; must not exceed serve.max_lora_rank
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    # 1e-4: the usual LoRA rate (LoRA needs ~10x the full-finetuning rate); with the paper's 2
    # epochs over a few hundred examples it moves the adapter without wrecking the base model.
    # Scaled by hyperparameters.learning_rate_multiplier.
    learning_rate: float = Field(1e-4, gt=0)
    max_length: int = Field(2048, ge=16)  # tokens per example; longer ones are truncated
    full_finetune: bool = False  # train all weights; the result is a model dir, not an adapter
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when present
    max_parallel_jobs: int = Field(1, ge=1)  # jobs training (or submitted to Ray) at once
    # CPU threads per job (torch.set_num_threads); None: torch's default, every core. On a CPU
    # shared with other work (or with max_parallel_jobs > 1), 1 avoids threads waiting on each
    # other: a SmolLM2 step took 85-120 s with 2 threads on a busy 2-core machine, 10 s with 1.
    threads: int | None = Field(None, ge=1)
    python: str | None = None  # interpreter with the `local` extra (on every Ray node); None: the running one
    # Where jobs run: "subprocess" (this machine, the default) or "ray" (a Ray cluster, see `ray`).
    runner: Literal["subprocess", "ray"] = "subprocess"
    # Where job directories live; None: <run dir>/local-jobs. With Ray on several nodes, a path on
    # storage every node mounts at the same place: jobs go to <jobs_dir>/<run>-<hash>/, training
    # files are copied there, and <run dir>/local-jobs links to it.
    jobs_dir: str | None = None
    # subprocess runner: GPUs handed out one per job through CUDA_VISIBLE_DEVICES, e.g. [0, 1, 2, 3];
    # at most len(devices) jobs run at once unless share_devices. None: the environment's as is.
    devices: list[int | str] | None = None
    share_devices: bool = False  # let more jobs than devices run, several on one GPU
    ray: RayJobsConfig = Field(default_factory=RayJobsConfig)

    @model_validator(mode="after")
    def _check_devices(self) -> "LocalFinetuneConfig":
        if self.devices is not None and not self.devices:
            raise ValueError("devices: an empty list leaves no GPU for any job; list GPUs (e.g. [0, 1]) or omit it")
        if self.devices is not None and len({str(d) for d in self.devices}) != len(self.devices):
            raise ValueError(f"devices: {self.devices} lists a GPU twice; list each once (share_devices: true "
                             f"lets jobs share them)")
        return self


class RayServeConfig(_Strict):
    """`serve.runner: ray`: each vLLM server is a Ray job (Job Submission API) on the cluster."""

    address: str | None = None  # the dashboard address, as finetune.local.ray.address
    # GPUs reserved per server; None: tensor_parallel_size x data_parallel_size. 0 when vLLM
    # places its own workers on the cluster (--distributed-executor-backend ray, multi-node).
    num_gpus_per_server: float | None = Field(None, ge=0)
    num_cpus_per_server: float = Field(1, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict)  # merged over the server's env_vars
    # The interface each server listens on: all of its node's, so the loop can reach it. A server
    # is reached at http://<its node's IP>:<port>/v1.
    bind_host: str = "0.0.0.0"
    check_resources: bool = True


class ServeConfig(_Strict):
    """The vLLM server for open models: started by the loop (`manage: true`) or attached to
    (endpoint.base_url, or several servers in `base_urls`)."""

    model: str | None = None  # base model path or hub id the server loads
    served_name: str = "base"  # the name debates use for the base model (models.base)
    manage: bool = False  # start and stop the server ourselves
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_lora_rank: int = 8  # vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512
    max_loras: int | None = Field(None, ge=1)  # adapters in one batch; None: 2 x debate.agents
    max_model_len: int | None = Field(None, ge=16)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # on CPU builds: share of RAM
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per model replica
    data_parallel_size: int = Field(1, ge=1)  # model replicas behind one server
    extra_args: list[str] = Field(default_factory=list)  # passed to vLLM as is
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the server
    python: str | None = None  # interpreter with vLLM; None: .venv-vllm/bin/python if present
    startup_timeout_s: float = Field(900.0, gt=0)
    # Several servers (e.g. one per GPU): agents are spread across them; adapters load on all.
    base_urls: list[str] = Field(default_factory=list)
    # manage: true only. Servers the loop starts: replica i listens on port + i. With the
    # subprocess runner, replica i gets GPUs devices[i*g:(i+1)*g] (g = tensor x data parallel
    # size) through CUDA_VISIBLE_DEVICES; with the ray runner each is a Ray job on the cluster.
    replicas: int = Field(1, ge=1)
    devices: list[int | str] | None = None  # subprocess runner: GPUs for the replicas; None: as is
    runner: Literal["subprocess", "ray"] = "subprocess"
    ray: RayServeConfig = Field(default_factory=RayServeConfig)

    @model_validator(mode="after")
    def _check_rank(self) -> "ServeConfig":
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank: vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512")
        return self

    @model_validator(mode="after")
    def _check_replicas(self) -> "ServeConfig":
        if self.port + self.replicas - 1 > 65535:
            raise ValueError(f"replicas: {self.replicas} servers from port {self.port} run past port 65535")
        if self.devices is not None:
            need = self.replicas * self.tensor_parallel_size * self.data_parallel_size
            if len(self.devices) < need:
                raise ValueError(f"devices: {self.replicas} replica(s) x {self.tensor_parallel_size * self.data_parallel_size} "
                                 f"GPU(s) each need {need} devices, {len(self.devices)} listed ({self.devices})")
        return self


class FinetuneConfig(_Strict):
    iterations: int = Field(0, ge=0)  # finetuning iterations after iteration 0's debate
    provider: Literal["openai", "local", "tinker"] = "openai"
    # Each iteration finetunes from the agent's previous models ("previous") or from the base.
    start_from: Literal["previous", "base"] = "previous"
    # Critic mix: w * D_C- + (1 - w) * D_C+ ; the authors' code amounts to w ~ 2/3.
    critic_weight: float = Field(2 / 3, ge=0, le=1)
    # Loss on the critic's first (possibly wrong) assistant turn; False writes weight: 0 there.
    critic_first_turn_loss: bool = False
    min_examples: int = Field(10, ge=1)  # OpenAI's minimum; an agent with fewer keeps its model
    max_example_tokens: int = Field(65536, ge=1)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    poll_interval_s: float = Field(5.0, gt=0)
    # A job paused at the provider (by its owner) is followed this long, then reported as paused
    # and the agent keeps its model; --resume picks the same job up again.
    paused_timeout_s: float = Field(1800.0, gt=0)
    suffix: str | None = None  # OpenAI model-name suffix; None: derived from run name
    # A tied final vote (e.g. three different answers) is broken by agent order, which would hand
    # the lowest-index agent training data nobody else supports. Such debates give no data
    # unless this is true (it is what taking the first most-common answer amounts to).
    use_tied_votes: bool = False
    # Which examples a model learns from (harness/ftdata.py has both rules):
    #   vote: the paper's method — answers that agree with the debate's majority vote; the gold
    #         answer is never read.
    #   star: the STaR baseline — the agent's own round-0 answers that match the GOLD answer, and
    #         for problems it got wrong, its answer when re-asked with a hint holding the gold
    #         answer (rationalization, harness/star.py). The only setting that reads gold for data.
    selection: Literal["vote", "star"] = "vote"
    # ONE model trained on the pooled data of every agent (generator and critic examples in one
    # file) and used by every agent in both roles: the paper's "single-agent FT" ablation, and
    # with debate.rounds=1 its "Majority FT" baseline. False: each agent trains its own models
    # on its own data (multiagent finetuning).
    single_model: bool = False
    # False: only the generators are finetuned; the critics stay the base model (the paper's
    # "multiagent FT w/o critic" ablation).
    train_critics: bool = True
    local: LocalFinetuneConfig = Field(default_factory=LocalFinetuneConfig)
    tinker: TinkerSettings = Field(default_factory=TinkerSettings)


class EvaluationConfig(_Strict):
    """The society that answers the test split, when it differs from the one that makes the
    training data (`debate`). None: the same as `debate`. E.g. the paper's "single-agent FT w/o
    debate": data from a 3-agent, 2-round debate; at test one agent answers once."""

    agents: int | None = Field(None, ge=1)
    rounds: int | None = Field(None, ge=1)


class AnalysisConfig(_Strict):
    """Diversity measures computed after each test debate (harness.diversity documents them)."""

    # Embeddings model for the answers' dissimilarity: "local:NAME" runs a sentence-transformers
    # model in-process (the `embed` extra); any other name is a model of the endpoint's
    # /embeddings route. "auto": sim-embed on the simulator; local:all-MiniLM-L6-v2 on OpenAI and
    # vLLM (offline, free, and the same model on both, so their numbers compare). null: skip.
    embedding_model: str | None = "auto"
    # Held-out-critic NLL and KL divergences from vLLM prompt logprobs (vLLM endpoints only; about
    # 4 (N+1) N scoring requests per problem for N agents).
    likelihood: bool = True
    likelihood_max_problems: int | None = Field(100, ge=1)  # problems scored; None: all
    # Scoring requests in flight at once (vLLM's CPU build with LoRA needs 1: see vllm-tiny).
    logprob_concurrency: int = Field(16, ge=1)

    def resolve_embedding_model(self, endpoint_kind: str) -> str | None:
        if self.embedding_model != "auto":
            return self.embedding_model
        return "sim-embed" if endpoint_kind == "simulator" else "local:all-MiniLM-L6-v2"


class RunConfig(_Strict):
    name: str = "demo"
    seed: int = 0
    task: TaskConfig = Field(default_factory=TaskConfig)
    endpoint: EndpointConfig = Field(default_factory=EndpointConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    debate: DebateConfig = Field(default_factory=DebateConfig)
    grading: GradingConfig = Field(default_factory=GradingConfig)
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    # Per-model prices in USD per million tokens, overriding the built-in table.
    prices: dict[str, dict[str, float]] = Field(default_factory=dict)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.endpoint.kind == "openai" and self.models.base.startswith("sim-"):
            raise ValueError("models.base: a simulated model (sim-*) needs endpoint.kind=simulator")
        return self

    @model_validator(mode="after")
    def _check_openai_ranges(self) -> "RunConfig":
        if self.finetune.provider != "openai" or self.finetune.iterations == 0:
            return self
        problem = openai_ft_range_error(self.finetune.hyperparameters, self.seed)
        if problem:
            raise ValueError(f"{problem}; the jobs would be refused after the debates were paid for")
        return self

    @model_validator(mode="after")
    def _check_local(self) -> "RunConfig":
        local = self.finetune.local
        if self.finetune.provider == "local" and local.full_finetune and self.endpoint.kind == "vllm":
            raise ValueError("finetune.local.full_finetune: a vLLM server loads LoRA adapters at run time, not whole "
                             "models; train adapters (full_finetune: false) or serve each agent's model yourself")
        if self.finetune.provider == "local" and not local.full_finetune and local.r > self.serve.max_lora_rank:
            raise ValueError(f"finetune.local.r: rank {local.r} exceeds serve.max_lora_rank "
                             f"{self.serve.max_lora_rank}; vLLM would refuse the adapters")
        return self

    @model_validator(mode="after")
    def _check_tinker(self) -> "RunConfig":
        from harness.providers.tinker_settings import tinker_config_error

        problem = tinker_config_error(self) if self.finetune.provider == "tinker" else None
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_method(self) -> "RunConfig":
        ft = self.finetune
        if ft.selection == "star" and self.debate.rounds != 1:
            raise ValueError("finetune.selection: star learns from the model's own answers without a debate; "
                             "set debate.rounds=1")
        agents = self.evaluation.agents or self.debate.agents
        if ft.iterations > 0 and not ft.single_model and agents > self.debate.agents:
            raise ValueError(f"evaluation.agents: {agents} agents at test, but only debate.agents="
                             f"{self.debate.agents} are finetuned; use at most {self.debate.agents}")
        return self

    @property
    def test_agents(self) -> int:
        """Agents of the society that answers the test split."""
        return self.evaluation.agents or self.debate.agents

    @property
    def test_rounds(self) -> int:
        return self.evaluation.rounds or self.debate.rounds

    @property
    def summarizer(self) -> str:
        return self.models.summarizer or self.models.base


# ----------------------------------------------------------------------------- loading

def _named_files(folder: str) -> list[str]:
    root = resources.files("harness.presets")
    if folder:
        root = root / folder
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_names() -> list[str]:
    return _named_files("")


def read_yaml_source(source: str, *, folder: str = "", what: str = "preset") -> tuple[dict, str]:
    """A YAML mapping from a file path, or from a named file shipped in harness/presets/<folder>
    (presets; comparison sets); returns (data, label used in error messages)."""
    names = ", ".join(_named_files(folder))
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist (built-in {what}s: {names})")
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    else:
        res = resources.files("harness.presets")
        res = (res / folder if folder else res) / f"{source}.yaml"
        if not res.is_file():
            raise ConfigError(f"{source!r} is neither a file nor a built-in {what}; built-in {what}s: {names}")
        label, text = f"{what} '{source}'", res.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {e}") from e
    if data is None:
        # An empty file is a mistake (a save cut short, the wrong file), not a request for defaults.
        raise ConfigError(f"{label}: the file is empty (no settings at all); write the fields that differ from the "
                          f"defaults (e.g. `task: {{n_test: 50}}`), or name a built-in {what} ({names})")
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data, label


class _OverrideLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 and 5E3 as floats. YAML 1.1 wants a dot and a signed
    exponent (1.0e-4), so PyYAML leaves these as strings, which a float field rejects and an
    untyped one (sampling.extra_body) would pass on as text. Being a resolver, it applies at any
    depth ({min_p: 1e-4}) and only to plain scalars: a quoted '1e-4' stays a string."""


_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _without_none(ann: Any) -> Any:
    """`X | None` -> X, so that an optional section or dict is recognised as one."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _override_path(parts: list[str]) -> tuple[list[str], Any]:
    """The keys to set in the config data, and the annotation of the value set (None: unknown).

    Below a dict-valued field the rest of the dotted path is ONE key, since dict keys may hold
    dots themselves (prices.gpt-4.1-mini). Found from the models, so new dict fields just work."""
    model: Any = RunConfig
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return parts, None  # unknown field or a value's sub-key: validation names the problem
        ann = _without_none(field.annotation)
        if get_origin(ann) is dict and i + 1 < len(parts):
            args = get_args(ann)
            return parts[: i + 1] + [".".join(parts[i + 1 :])], args[1] if len(args) == 2 else None
        model = ann
    return parts, model


def _apply_override(data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. debate.agents=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts, target = _override_path(key.strip().split("."))
    if _without_none(target) is str and isinstance(value, (bool, int, float)):
        value = raw.strip()  # a text field given 1, 1e5 or yes (serve.env.X=1) keeps the text
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _explain(e: ValidationError, label: str) -> str:
    lines = [f"invalid configuration in {label}:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(err["loc"][:-1])
            msg = f"unknown field; allowed here: {', '.join(allowed)}"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  field '{field}': {msg}")
    return "\n".join(lines)


def _allowed_fields(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def load_config(source: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset name or YAML path (default: the `demo` preset) and apply `--set` overrides."""
    data, label = read_yaml_source(source or "demo")
    return config_from_data(data, label, overrides)


def config_from_data(data: dict, label: str, overrides: list[str] | None = None) -> RunConfig:
    """Validate config data (as read from YAML) after applying `--set` overrides; errors name `label`."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        _apply_override(data, item)
    if overrides:
        label += f" with --set {' '.join(overrides)}"
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(e, label)) from None


def config_to_yaml(cfg: RunConfig) -> str:
    """The resolved config as saved in the run directory. It holds no secrets by construction:
    keys are read from the environment variable the config names."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
