"""Select each agent's finetuning examples from the debate records (DESIGN §2) and write them as
OpenAI chat JSONL: out_dir/generator-<n>.jsonl, critic-<n>.jsonl and stats.json.

The rules, for one debate with final vote ŷ (`record.vote.answer`):

* Generator data of agent n: its round-0 answer is equivalent to ŷ. The example is the task
  prompt (and a system message, if the conversation has one) followed by that round-0 reply.
* Critic data of agent n: its final-round answer is equivalent to ŷ. C- when its round-0 answer
  was not (wrong, then corrected), C+ when it was (right in both). The example is the agent's
  whole conversation. With `critic_first_turn_loss` False (the default) the first assistant turn
  gets `"weight": 0`: the critic should learn to revise, not to produce the round-0 answer.
* Critic mix D_C = w·C- + (1-w)·C+, with w = `critic_weight`, as counts (see `critic_mix`).

In this rule (`build_ftdata`, the paper's method) only the vote selects data: the gold answer
and the records' `correct` fields are never read (they are for evaluation). Each agent's files are built only from transcripts whose
`AgentTranscript.agent` is that agent: the society stays diverse only if agents never share data.
A debate with no vote (no parseable final answer) yields nothing; so does an unparseable answer.

Two other rules serve the paper's baselines and ablations (§3.2, Tables 1-2):

* **STaR** (`finetune.selection: star`, `build_star_ftdata`): generator data of agent n = its
  round-0 answers equivalent to the GOLD answer, plus, for the others, its rationalized answer
  (harness/star.py: asked again with a hint holding gold) when that is equivalent to gold; the
  example is the plain task prompt without the hint and the rationalized reply. STaR has no
  critic data. **It reads gold: no other rule does**, and its stats.json says so (`reads_gold`).
* **One model** (`finetune.single_model`, `pool_one_model`): every agent's generator and critic
  examples in ONE file, for one model that every agent then uses in both roles (single-agent FT;
  with debate.rounds=1 there are only generator examples: Majority FT).
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from pathlib import Path
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, Field

from harness.config import FinetuneConfig
from harness.errors import DataError
from harness.fileio import read_jsonl, write_jsonl_atomic, write_model
from harness.records import AgentTranscript, DebateRecord, Message, Rationalization

log = logging.getLogger(__name__)

CRITIC_MIX_RULE = (
    "keep every C- example; keep round(|C-|*(1-w)/w) C+ examples drawn at random (seeded, per "
    "agent), capped by the C+ available; if that leaves fewer than min_examples in all, add C+ "
    "up to min_examples, so a shortage of C- (none at all included) never by itself stops the "
    "critic from training; w=0 keeps all C+ and no C-; w=1 keeps only C-")


class AgentFtStats(BaseModel):
    agent: int
    generator_examples: int
    critic_minus_available: int
    critic_minus_kept: int
    critic_plus_available: int
    critic_plus_kept: int
    critic_examples: int
    critic_weight: float  # w as configured
    critic_minus_share: float | None  # the share of C- actually achieved (None: no critic data)
    critic_first_turn_loss: bool
    # Unparseable answers seen (informational): an unparseable round-0 answer is simply not
    # equivalent to the vote, so such a transcript can still be C- if its final answer is.
    unparsed_round0: int
    unparsed_final: int
    # STaR only (selection: star); None otherwise.
    gold_correct: int | None = None  # round-0 answers equivalent to gold, kept as they are
    rationalized_tried: int | None = None  # wrong round-0 answers asked again with the gold hint
    rationalized_kept: int | None = None  # of those, the ones now equivalent to gold


class FileStats(BaseModel):
    path: str  # relative to the directory holding stats.json
    role: Literal["generator", "critic"]
    agent: int
    examples: int
    sha256: str  # of the file's bytes, as uploaded


VOTE_RULE = "answers equivalent to the debate's majority vote; the gold answer is never read"
STAR_RULE = ("STaR: round-0 answers equivalent to the GOLD answer, plus rationalized answers (asked again "
             "with a hint holding the gold answer) that are then equivalent to gold, trained without the hint")


class FtDataStats(BaseModel):
    schema_version: int = 1
    selection: Literal["vote", "star"] = "vote"
    selection_rule: str = VOTE_RULE
    reads_gold: bool = False  # True only for STaR: the gold answer chose the data
    n_records: int
    n_records_with_vote: int
    n_records_tied_skipped: int = 0  # tied final votes, left out (finetune.use_tied_votes: false)
    # Votes with fewer parsed final answers than finetune.min_voters, left out (vote rule only).
    min_voters: int = 1
    n_records_few_voters_skipped: int = 0
    n_agents: int
    seed: int
    critic_weight: float
    critic_first_turn_loss: bool
    critic_mix_rule: str = CRITIC_MIX_RULE
    agents: list[AgentFtStats] = Field(default_factory=list)
    files: list[FileStats] = Field(default_factory=list)

    def file(self, role: str, agent: int) -> FileStats:
        for f in self.files:
            if f.role == role and f.agent == agent:
                return f
        raise KeyError(f"no {role} file for agent {agent}")


def critic_mix(n_minus: int, n_plus: int, w: float, min_examples: int) -> tuple[int, int]:
    """How many C- and C+ examples to keep (see CRITIC_MIX_RULE)."""
    if w <= 0:
        return 0, n_plus
    if w >= 1:
        return n_minus, 0
    # round half up: Python's round() rounds halves to even, which would make 1 C- keep 0 C+.
    target = math.floor(n_minus * (1 - w) / w + 0.5)
    plus = max(target, min_examples - n_minus)
    return n_minus, max(0, min(n_plus, plus))


def _to_dicts(messages: Sequence[Message]) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in messages]


def generator_example(t: AgentTranscript) -> dict | None:
    """[system?, task prompt, round-0 reply]: everything up to the first assistant turn."""
    for i, m in enumerate(t.messages):
        if m.role == "assistant":
            head = t.messages[: i + 1]
            return {"messages": _to_dicts(head)} if any(x.role == "user" for x in head) else None
    return None


def task_prompt(t: AgentTranscript) -> list[Message]:
    """[system?, task prompt]: the transcript up to and including its first user message."""
    for i, m in enumerate(t.messages):
        if m.role == "user":
            return list(t.messages[: i + 1])
    return []


def critic_example(t: AgentTranscript, first_turn_loss: bool) -> dict | None:
    """The whole conversation through its last assistant turn; weight 0 on the first assistant
    turn unless its loss is wanted. None when there is no later turn to learn from."""
    last = max((i for i, m in enumerate(t.messages) if m.role == "assistant"), default=None)
    if last is None:
        return None
    msgs = _to_dicts(t.messages[: last + 1])
    assistant_idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if len(assistant_idx) < 2:
        return None  # a one-round conversation has no revision in it
    if not first_turn_loss:
        msgs[assistant_idx[0]]["weight"] = 0
    return {"messages": msgs}


class _Equiv:
    """`harness.grading.equivalent`, memoized: the same answer pairs recur across agents."""

    def __init__(self, timeout_s: float):
        from harness.grading import equivalent  # imported late: grading pulls in math-verify

        self._eq: Callable[..., bool] = equivalent
        self._timeout_s = timeout_s
        self._memo: dict[tuple[str, str], bool] = {}

    def __call__(self, a: str | None, b: str | None) -> bool:
        if a is None or b is None:
            return False
        key = (a, b)
        if key not in self._memo:
            self._memo[key] = bool(self._eq(a, b, timeout_s=self._timeout_s))
        return self._memo[key]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_ftdata(records: Sequence[DebateRecord], *, n_agents: int, cfg: FinetuneConfig,
                 out_dir: Path, seed: int, timeout_s: float = 5.0) -> FtDataStats:
    """Write every agent's generator and critic files and stats.json; returns the stats."""
    out_dir = Path(out_dir)
    eq = _Equiv(timeout_s)
    gen: list[list[dict]] = [[] for _ in range(n_agents)]
    # Critic candidates keep their record index so the written file follows record order.
    minus: list[list[tuple[int, dict]]] = [[] for _ in range(n_agents)]
    plus: list[list[tuple[int, dict]]] = [[] for _ in range(n_agents)]
    unparsed0 = [0] * n_agents
    unparsed_final = [0] * n_agents
    with_vote = 0
    tied_skipped = 0
    few_voters = 0

    for r, rec in enumerate(records):
        y_hat = rec.vote.answer if rec.round_votes else None
        if y_hat is None:
            continue
        with_vote += 1
        if rec.vote.tie and not cfg.use_tied_votes:
            tied_skipped += 1
            continue
        if rec.vote.n_voters < cfg.min_voters:
            few_voters += 1
            continue
        seen: set[int] = set()
        for t in rec.agents:
            n = t.agent
            if not 0 <= n < n_agents:
                raise DataError(f"debate record {rec.problem.id!r}: field 'agents.agent' is {n}, outside "
                                f"0..{n_agents - 1}; the debate and the finetuning disagree on the number of agents")
            if n in seen:
                raise DataError(f"debate record {rec.problem.id!r}: agent {n} appears twice in 'agents'")
            seen.add(n)
            if not t.answers:
                continue
            first, final = t.answers[0], t.answers[-1]
            unparsed0[n] += first is None
            unparsed_final[n] += final is None
            first_ok = eq(first, y_hat)
            if first_ok:
                ex = generator_example(t)
                if ex is not None:
                    gen[n].append(ex)
            if len(t.answers) >= 2 and eq(final, y_hat):
                ex = critic_example(t, cfg.critic_first_turn_loss)
                if ex is not None:
                    (plus if first_ok else minus)[n].append((r, ex))

    stats = FtDataStats(n_records=len(records), n_records_with_vote=with_vote, n_agents=n_agents,
                        n_records_tied_skipped=tied_skipped, min_voters=cfg.min_voters,
                        n_records_few_voters_skipped=few_voters,
                        seed=seed, critic_weight=cfg.critic_weight,
                        critic_first_turn_loss=cfg.critic_first_turn_loss)
    for n in range(n_agents):
        keep_minus, keep_plus = critic_mix(len(minus[n]), len(plus[n]), cfg.critic_weight, cfg.min_examples)
        # A per-agent stream: one agent's data never shifts another's sample.
        rng = random.Random(f"critic-mix/{seed}/{n}")
        kept_plus = [plus[n][i] for i in rng.sample(range(len(plus[n])), keep_plus)]
        kept_minus = minus[n][:keep_minus]  # all of them, or none when w=0
        critic = [ex for _, ex in sorted(kept_minus + kept_plus, key=lambda p: p[0])]
        total = len(critic)
        stats.agents.append(AgentFtStats(
            agent=n, generator_examples=len(gen[n]),
            critic_minus_available=len(minus[n]), critic_minus_kept=keep_minus,
            critic_plus_available=len(plus[n]), critic_plus_kept=keep_plus, critic_examples=total,
            critic_weight=cfg.critic_weight,
            critic_minus_share=(keep_minus / total) if total else None,
            critic_first_turn_loss=cfg.critic_first_turn_loss,
            unparsed_round0=unparsed0[n], unparsed_final=unparsed_final[n]))
        _write_agent_files(stats, out_dir, n, gen[n], critic)
        log.info("agent %d: %d generator examples; critic %d (C- %d/%d, C+ %d/%d)", n, len(gen[n]),
                 total, keep_minus, len(minus[n]), keep_plus, len(plus[n]))
    write_model(out_dir / "stats.json", stats)
    return stats


def _write_agent_files(stats: FtDataStats, out_dir: Path, n: int, gen: list[dict], critic: list[dict]) -> None:
    for role, rows in (("generator", gen), ("critic", critic)):
        path = out_dir / f"{role}-{n}.jsonl"
        write_jsonl_atomic(path, rows)
        stats.files.append(FileStats(path=path.name, role=role, agent=n, examples=len(rows), sha256=_sha256(path)))


def build_star_ftdata(records: Sequence[DebateRecord], rationalizations: Sequence[Rationalization], *,
                      n_agents: int, cfg: FinetuneConfig, out_dir: Path, seed: int,
                      timeout_s: float = 5.0) -> FtDataStats:
    """STaR's data (the module docstring): generator-<n>.jsonl from gold-correct round-0 answers
    and gold-correct rationalizations; critic-<n>.jsonl empty. READS THE GOLD ANSWER."""
    out_dir = Path(out_dir)
    eq = _Equiv(timeout_s)
    hinted = {(r.problem_id, r.agent): r for r in rationalizations}
    gen: list[list[dict]] = [[] for _ in range(n_agents)]
    counts = [[0, 0, 0, 0, 0] for _ in range(n_agents)]  # gold-correct, tried, kept, unparsed round 0, final
    for rec in records:
        for t in rec.agents:
            n = t.agent
            if not 0 <= n < n_agents:
                raise DataError(f"debate record {rec.problem.id!r}: field 'agents.agent' is {n}, outside "
                                f"0..{n_agents - 1}; the sampling and the finetuning disagree on the number of agents")
            if not t.answers:
                continue
            counts[n][3] += t.answers[0] is None
            counts[n][4] += t.answers[-1] is None
            if eq(t.answers[0], rec.problem.gold):  # gold read on purpose: this is STaR
                ex = generator_example(t)
                if ex is not None:
                    gen[n].append(ex)
                    counts[n][0] += 1
                continue
            r = hinted.get((rec.problem.id, n))
            if r is None:
                continue
            counts[n][1] += 1
            head = task_prompt(t)
            if r.correct and r.answer is not None and not r.truncated and head:
                reply = next(m.content for m in reversed(r.messages) if m.role == "assistant")
                gen[n].append({"messages": _to_dicts([*head, Message(role="assistant", content=reply)])})
                counts[n][2] += 1
    stats = FtDataStats(selection="star", selection_rule=STAR_RULE, reads_gold=True, n_records=len(records),
                        n_records_with_vote=sum(1 for r in records if r.round_votes and r.vote.answer is not None),
                        n_agents=n_agents, seed=seed, critic_weight=cfg.critic_weight,
                        critic_first_turn_loss=cfg.critic_first_turn_loss)
    for n in range(n_agents):
        ok, tried, kept, u0, uf = counts[n]
        stats.agents.append(AgentFtStats(
            agent=n, generator_examples=len(gen[n]), critic_minus_available=0, critic_minus_kept=0,
            critic_plus_available=0, critic_plus_kept=0, critic_examples=0, critic_weight=cfg.critic_weight,
            critic_minus_share=None, critic_first_turn_loss=cfg.critic_first_turn_loss, unparsed_round0=u0,
            unparsed_final=uf, gold_correct=ok, rationalized_tried=tried, rationalized_kept=kept))
        _write_agent_files(stats, out_dir, n, gen[n], [])
        log.info("agent %d (STaR): %d gold-correct answers, %d of %d rationalizations kept", n, ok, kept, tried)
    write_model(out_dir / "stats.json", stats)
    return stats


ONE_MODEL_FILE = "one-model.jsonl"


def pool_one_model(stats: FtDataStats, out_dir: Path, roles: Sequence[str]) -> FtDataStats:
    """Single-agent FT (and Majority FT, STaR): the examples of every agent for `roles`
    (generator and critic examples together) in ONE file, trained as ONE model that every agent
    then uses in every role. Returned as agent 0's generator file; stats-one-model.json says so.
    Multiagent finetuning never calls this: there each agent keeps to its own data."""
    out_dir = Path(out_dir)
    pooled = stats.model_copy(deep=True)
    rows = [row for role in roles for n in range(stats.n_agents) for row in read_jsonl(out_dir / stats.file(role, n).path)]
    path = out_dir / ONE_MODEL_FILE
    write_jsonl_atomic(path, rows)
    pooled.files = [FileStats(path=path.name, role="generator", agent=0, examples=len(rows), sha256=_sha256(path))]
    write_model(out_dir / "stats-one-model.json", pooled)
    return pooled
