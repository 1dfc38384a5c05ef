"""Run configuration: a pydantic model loaded from YAML, named presets, `--set` overrides.

A bad config fails here, before any call, with a message naming the file, the field and what
is allowed. Secrets never live in the config: it names the environment variable to read.

This module holds RunConfig and most of its sections; the open-model sections (`serve`,
`finetune.local`) are in harness.config_local and the loading (presets, YAML, `--set`, error
messages) in harness.config_loading, bound to RunConfig here (`load_config`, `config_from_data`).
Import everything from harness.config.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harness.errors import ConfigError
from harness.config_base import _http_url, _Strict
from harness.config_loading import config_to_yaml, load_model, preset_names, read_yaml_source, validate_data  # noqa: F401
from harness.config_local import LocalFinetuneConfig, RayJobsConfig, RayServeConfig, ServeConfig  # noqa: F401
from harness.providers.openai_settings import OPENAI_FT_RANGES, openai_ft_range_error  # noqa: F401
from harness.providers.together_settings import TogetherSettings
from harness.providers.azure_settings import AzureSettings, AzureSimSettings, azure_config_error
from harness.llm.batch_settings import BatchSettings
from harness.tracking.settings import TrackingConfig
from harness.providers.tinker_settings import TinkerSettings
from harness.scaling_settings import HardwareSettings


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
    # prompts word for word, for arithmetic, gsm8k and math, with their order of the others'
    # answers: anonymous, shuffled, at most 5 for math; all, in agent order, for gsm8k and
    # arithmetic (the authors' code did not shuffle there). See harness/prompts.py and
    # harness/resources/prompts/authors/README.md.
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
    azure: AzureSimSettings = Field(default_factory=AzureSimSettings)  # Azure's deployment step
    # The Batch API (harness/sim/batches.py): seconds from a batch's creation to its completion,
    # the share of its lines answered with a 500 in the error file, and the share of batches that
    # expire instead of completing (half their lines answered).
    batch_seconds: float = Field(2.0, ge=0)
    batch_error_rate: float = Field(0.0, ge=0, le=1)  # share of a batch's lines answered with a 500
    batch_expire_rate: float = Field(0.0, ge=0, le=1)  # share of batches that expire half answered
    # Adapter names (fnmatch patterns) that load and are listed but answer as their base model: the
    # silent failure the adapter probes (serve.probe) catch.
    unapplied_adapters: list[str] = Field(default_factory=list)


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
    # Send debate rounds (and an endpoint embedding model's calls) through OpenAI's Batch API (half price; see
    # docs/howto/batch.md and harness/llm/batch.py); batch_settings: polling, waiting, retries.
    batch: bool = False
    batch_settings: BatchSettings = Field(default_factory=BatchSettings)
    simulator: SimulatorConfig = Field(default_factory=SimulatorConfig)

    _check_base_url = field_validator("base_url")(lambda cls, v: v if v is None else _http_url(v))

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


class Hyperparameters(_Strict):
    # The paper's defaults.
    n_epochs: int = Field(2, ge=1)
    batch_size: int = Field(1, ge=1)
    learning_rate_multiplier: float = Field(1.0, gt=0)


class FinetuneConfig(_Strict):
    iterations: int = Field(0, ge=0)  # finetuning iterations after iteration 0's debate
    provider: Literal["openai", "local", "azure", "together", "tinker"] = "openai"
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
    # A debate's vote selects training data only when at least this many agents gave a parseable
    # final answer. The paper's authors' code takes the most common parsed answer whatever the
    # count, so one parsed answer out of three is a "majority" there: their behaviour is 1 (the
    # default). 2 with 3 agents asks for an actual agreement between parsed answers' voters.
    min_voters: int = Field(1, ge=1)
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
    together: TogetherSettings = Field(default_factory=TogetherSettings)
    azure: AzureSettings = Field(default_factory=AzureSettings)  # provider azure: harness/providers/azure_settings.py
    tinker: TinkerSettings = Field(default_factory=TinkerSettings)  # provider tinker: harness/providers/tinker_settings.py


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
    # Held-out-critic NLL and KL divergences (the paper's likelihood measures) from prompt
    # log-probabilities: about 4 (N+1) N scoring requests per problem for N agents.
    likelihood: bool = True
    # Who computes them: "vllm" (the endpoint's prompt logprobs), "transformers" (in-process, the
    # base weights + the local provider's saved LoRA adapters: any endpoint, e.g. on a CPU where
    # vLLM cannot score adapters), "auto" (vllm on a vLLM endpoint, else transformers with the
    # local provider, else off). harness/diversity/local_scoring.py.
    likelihood_backend: Literal["auto", "vllm", "transformers"] = "auto"
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
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)  # harness/tracking/settings.py
    hardware: HardwareSettings = Field(default_factory=HardwareSettings)  # GPUs the --dry-run plans for

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if self.endpoint.kind == "openai" and self.models.base.startswith("sim-"):
            raise ValueError("models.base: a simulated model (sim-*) needs endpoint.kind=simulator")
        if self.endpoint.batch and self.endpoint.kind == "vllm":
            raise ValueError("endpoint.batch: a vLLM server has no Batch API; use endpoint.batch=false (a local "
                             "server costs nothing per token anyway), or an OpenAI endpoint")
        return self

    @model_validator(mode="after")
    def _check_openai_ranges(self) -> "RunConfig":
        if self.finetune.provider == "azure":
            problem = azure_config_error(self)
            if problem:
                raise ValueError(problem)
        if self.finetune.provider not in ("openai", "azure") or self.finetune.iterations == 0:
            return self
        problem = openai_ft_range_error(self.finetune.hyperparameters, self.seed)
        if problem:
            raise ValueError(f"{problem}; the jobs would be refused after the debates were paid for")
        return self

    @model_validator(mode="after")
    def _check_local(self) -> "RunConfig":
        local = self.finetune.local
        from harness.serve_full import full_serving_error  # one vLLM server per fully finetuned model

        problem = full_serving_error(self)
        if problem:
            raise ValueError(problem)
        if self.finetune.provider == "local" and local.accumulation_error(self.finetune.hyperparameters.batch_size):
            raise ValueError(local.accumulation_error(self.finetune.hyperparameters.batch_size))
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
    def _check_together(self) -> "RunConfig":
        from harness.providers.together_settings import together_epochs_error

        if self.finetune.provider != "together" or self.finetune.iterations == 0:
            return self
        problem = together_epochs_error(self.finetune.hyperparameters.n_epochs)
        if problem:
            raise ValueError(f"{problem}; the jobs would be refused after the debates were paid for")
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


def load_config(source: str | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a preset name or YAML path (default: the `demo` preset) and apply `--set` overrides."""
    return load_model(RunConfig, source, overrides)


def config_from_data(data: dict, label: str, overrides: list[str] | None = None) -> RunConfig:
    """Validate config data (as read from YAML) after applying `--set` overrides; errors name `label`."""
    return validate_data(RunConfig, data, label, overrides)
