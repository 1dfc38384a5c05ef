"""Every record the harness persists, as pydantic models (the run-directory contract, DESIGN §5).

Notebooks and the report read these files; change a field only with a schema_version bump.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Role = Literal["system", "user", "assistant"]


class Problem(BaseModel):
    """One task instance. `gold` is used for evaluation only, never to select training data,
    except by the STaR baseline (harness/star.py, `finetune.selection: star`), which says so."""

    id: str
    task: str
    question: str
    gold: str
    meta: dict[str, Any] = Field(default_factory=dict)


class Message(BaseModel):
    role: Role
    content: str


class SampleId(BaseModel):
    """Which sample a model call is. Part of the cache key, so two agents sending the same
    prompt at temperature 1 stay two distinct samples (DESIGN §5)."""

    model_config = ConfigDict(frozen=True)

    iteration: int
    split: str
    problem_id: str
    role: Literal["agent", "summarizer", "rationalizer"] = "agent"  # rationalizer: STaR's hinted retry
    agent: int
    round: int
    sample: int = 0

    def key(self) -> str:
        return f"it{self.iteration}/{self.split}/{self.problem_id}/{self.role}{self.agent}/r{self.round}/s{self.sample}"


class VoteClass(BaseModel):
    """One equivalence class of answers: its representative and the agents that gave it."""

    answer: str
    agents: list[int]


class Vote(BaseModel):
    answer: str | None  # None when no agent gave a parseable answer
    count: int  # members of the winning class
    n_voters: int  # agents with a parseable answer
    classes: list[VoteClass]
    tie: bool  # several classes shared the top count
    tie_rule: str  # how the tie was broken, recorded with every vote


class AgentTranscript(BaseModel):
    """One agent's own multi-turn conversation in a debate, with its parsed answer per round."""

    agent: int
    models: list[str]  # model id used in each round (generator in round 0, critic after)
    messages: list[Message]
    answers: list[str | None]  # parsed final answer per round (None: unparseable or cut off)
    correct: list[bool]  # per round, against gold (evaluation only)
    # per round: the reply hit max_tokens. A cut-off reply does not vote (its last number is
    # an intermediate step, not an answer); raise sampling.max_tokens if this is common.
    truncated: list[bool] = Field(default_factory=list)
    # per round: why the server refused this turn (e.g. context length exceeded), else None. A
    # refused turn is an empty, unparseable reply; the debate goes on.
    errors: list[str | None] = Field(default_factory=list)
    # per round: the model the server's answer says produced the reply (its `model` field: for
    # vLLM the base or adapter name the request named), None where it named none (a refused turn,
    # a reply cached by an older run). Empty in records written before it was kept. `models` holds
    # what was asked for; iter-<k>/adapter-probes.json shows that each adapter was applied.
    served: list[str | None] = Field(default_factory=list)


class DebateRecord(BaseModel):
    """One problem's whole debate; one line of iter-<k>/debate-<split>.jsonl."""

    schema_version: int = 1
    iteration: int
    split: str
    problem: Problem
    agents: list[AgentTranscript]
    round_votes: list[Vote]  # majority vote after each round; the last one is the debate's vote
    round_correct: list[bool] = Field(default_factory=list)  # each round's vote vs gold (evaluation only)
    correct: bool  # final vote equivalent to gold (an unparseable vote is wrong)

    @property
    def vote(self) -> Vote:
        return self.round_votes[-1]


class Rationalization(BaseModel):
    """One line of iter-<k>/star-rationalize.jsonl (the STaR baseline only, harness/star.py): a
    training problem whose round-0 answer did not match the GOLD answer, asked again with a hint
    holding the gold answer. Kept for training (without the hint) only when `correct`."""

    schema_version: int = 1
    iteration: int
    problem_id: str
    agent: int
    model: str
    messages: list[Message]  # the hinted request as sent, then the reply
    answer: str | None  # parsed final answer of the reply (None: unparseable or cut off)
    truncated: bool = False
    error: str | None = None  # why the server refused the request, else None
    correct: bool  # the rationalized answer is equivalent to gold (reads gold: STaR only)


class UsageRecord(BaseModel):
    """One line of usage.jsonl: one model call (or one cache hit, with cached=true)."""

    ts: float
    model: str
    sample: SampleId | None = None
    purpose: str = "debate"
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_prompt_tokens: int | None = None
    latency_s: float
    cost_usd: float | None  # None: the price of this model is unknown (never reported as $0)
    cached: bool  # answered from the run's response cache: no API call was made
    attempts: int = 1  # HTTP requests made for this answer, rate-limited ones included
    call_id: str | None = None  # the request's id in calls-in-flight.jsonl (None: a cache hit, or an older run)
    # Answered through the Batch API (harness/llm/batch.py): the batch's id, and cost_usd is at
    # batch price; latency_s is then the batch's turnaround.
    batch_id: str | None = None


class SplitMetrics(BaseModel):
    """iter-<k>/metrics.json holds one of these per evaluated split."""

    iteration: int
    split: str
    n: int  # all problems: an unparseable vote counts as wrong, never dropped
    accuracy: float  # majority vote of the final round
    stderr: float  # sqrt(p(1-p)/n)
    per_round: list[float]  # majority-vote accuracy after each round
    per_agent: list[float]  # each agent's final-round accuracy
    per_agent_round: list[list[float]]  # [agent][round] accuracy
    truncated_rate: float = 0.0  # share of agent replies (all rounds) cut off by max_tokens
    agreement: float  # "all agree": share of problems where every agent's final answer is equivalent
    pairwise_agreement: float  # mean over agent pairs of final-answer equivalence
    # The authors' "consensus" (their eval_math.py): the share of all parsed final-round answers
    # (pooled over problems) that equal their problem's majority answer; None: nothing parsed.
    consensus: float | None = None
    unparsed_rate: float  # share of final-round agent answers that could not be parsed
    simulated: bool = False  # numbers from the built-in simulator are a test double's


class IterationMetrics(BaseModel):
    """iter-<k>/metrics.json."""

    iteration: int
    splits: dict[str, SplitMetrics]
    generators: list[str]  # the society that was evaluated
    critics: list[str]


class StageTiming(BaseModel):
    """One line of stages.jsonl: the wall time of one stage in one session of the loop. A resumed
    stage gets a line per session; the sum over lines is the stage's total."""

    iteration: int
    stage: Literal["debate", "diversity", "ftdata", "finetune", "load_adapters", "serve_models"]
    split: str | None = None  # debate: test or train
    started_at: float  # unix time
    seconds: float


class RunSummary(BaseModel):
    """summary.json: what the notebooks plot; rewritten atomically after every iteration."""

    schema_version: int = 1
    run: str
    simulated: bool
    iterations: list[IterationMetrics]
    usage: dict[str, Any] = Field(default_factory=dict)  # calls, tokens, cost (None parts unknown)
    # What a reader of the numbers must know, e.g. finetuning jobs that failed (those agents kept
    # their previous models).
    warnings: list[str] = Field(default_factory=list)
    finished: bool = False
