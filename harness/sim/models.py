"""Simulated models: how a simulated agent answers a chat request. A test double, not a model.

Rules (every number a simulated run reports follows from these):

* **Which models exist.** Any name starting with ``sim-`` is a base model with parameters from
  ``SimulatorConfig``: ``skill`` (chance of a correct round-0 answer), ``persuadability``
  (chance to adopt the other agents' majority in a later round) and ``correction`` = skill / 2
  (extra chance, in a later round, to switch to the correct answer when another agent gave it).
  A name containing ``strong`` has skill s + (1 - s) / 2; one containing ``weak`` has s / 2.
  Finetuned models (``ft:...``) and loaded LoRA adapters get parameters from their training
  data (see ``training.py``).
* **The problem** is read from the first user message: a known problem whose question text
  occurs in it (its gold answer), else the arithmetic expression ``a+b*c+d-e*f`` (computed),
  else an unknown question (a fixed plausible number per model and prompt; skill is irrelevant).
* **Mistakes are model-specific**: each (model, problem) has three fixed wrong answers (gold plus
  an offset from a hash; another option letter for multiple choice); a wrong sample picks the
  first with probability 0.6, the second 0.25, the third 0.15.
* **Round 0** (no assistant turn yet): correct with probability ``skill``, else a wrong answer.
  The reply is a few lines of reasoning and then ``\\boxed{ANSWER}``.
* **A hint** (STaR's rationalization, ``harness/resources/prompts/default/star_hint.txt``): a round-0 request whose
  first user message has a line beginning with "Hint" (any case) that holds a non-empty
  ``\\boxed{X}`` answers X with probability (1 + ``skill``) / 2 (a model can mostly turn a given
  answer into a derivation, a stronger one more often), else as without the hint. The problem
  is still found, since the hint prompt holds the whole task prompt; a reply that adopts the
  hint is graded like any other, so a hint holding a wrong answer teaches a wrong answer.
* **Later rounds** (the conversation has assistant turns): the other agents' answers are every
  ``\\boxed{}`` in the last user message but ``\\boxed{answer}`` (the authors' prompts' format
  example). With probability ``persuadability`` the model adopts their majority (ties: a seeded
  draw) if it differs from its own previous answer; then, if the answer is still wrong and the
  correct answer is among the others', it switches to it with probability ``correction``;
  otherwise it keeps its previous answer (a fresh round-0 draw if its previous answer was
  unparseable).
* **Summarizer**: a request with no assistant turn whose last user message contains "summar"
  (any case) and either a ``\\boxed{}`` answer or the word "agent" is answered with one line
  per ``\\boxed{}`` answer found in it ("One agent answered \\boxed{12}, ...").
* **Malformed answers**: with probability ``malformed_rate`` the reply has no ``\\boxed{}`` and
  no trailing number.
* **Randomness** is a private generator per sample, seeded from (config seed, model, messages,
  request seed, choice index): the same request gives the same answer, another ``seed`` gives
  an independent sample. At temperature 0 the request seed and choice index are left out
  (greedy decoding gives one answer). A request without a ``seed`` is sampled afresh, as on a
  real server: the app passes its count of unseeded samples so far in place of the choice
  index, so identical unseeded requests (agents sharing a prompt) differ at temperature > 0.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from harness.config import SimulatorConfig
from harness.sim.knowledge import Fact, Knowledge, boxed_all, final_answer, normalize, plausible_number, rng_for, wrong_answers

BASE_MODELS = ("sim-base", "sim-strong", "sim-weak")  # listed by /v1/models; any sim-* works
_WRONG_WEIGHTS = (0.6, 0.25, 0.15)


class ModelParams(BaseModel):
    """The behaviour of one simulated model (persisted with finetuned models)."""

    model_config = ConfigDict(extra="forbid")

    skill: float = Field(ge=0, le=1)
    persuadability: float = Field(ge=0, le=1)
    correction: float = Field(ge=0, le=1)
    parent: str | None = None  # the model this one was finetuned from
    note: str = ""  # how the parameters were derived (shown in job events)


def base_params(name: str, cfg: SimulatorConfig) -> ModelParams:
    skill = cfg.skill
    lowered = name.lower()
    if "strong" in lowered:
        skill = skill + (1 - skill) / 2
    elif "weak" in lowered:
        skill = skill / 2
    return ModelParams(skill=skill, persuadability=cfg.persuadability, correction=skill / 2, note="base model")


def _text(content: object) -> str:
    """Message content as text: a string, or the text parts of a list of content parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return str(content)


def sample_rng_key(cfg_seed: int, model: str, messages: Sequence[dict], seed: int | None, choice: int, temperature: float | None):
    convo = [[m.get("role"), _text(m.get("content"))] for m in messages]
    if temperature == 0:
        seed, choice = None, 0
    return ("chat", cfg_seed, model, convo, seed, choice)


def respond(
    model: str,
    params: ModelParams,
    messages: Sequence[dict],
    knowledge: Knowledge,
    cfg: SimulatorConfig,
    *,
    seed: int | None = None,
    choice: int = 0,
    temperature: float | None = None,
) -> str:
    """The text of one simulated completion."""
    rng = rng_for(*sample_rng_key(cfg.seed, model, messages, seed, choice, temperature))
    turns = [(m.get("role"), _text(m.get("content"))) for m in messages]
    assistant_turns = [c for r, c in turns if r == "assistant"]
    user_turns = [c for r, c in turns if r == "user"]
    last_user = user_turns[-1] if user_turns else ""
    if not assistant_turns and is_summary_request(last_user):
        return summarize(last_user, rng)

    fact = knowledge.lookup(user_turns[0] if user_turns else "")
    malformed = rng.random() < cfg.malformed_rate
    if not assistant_turns:
        answer = _first_answer(model, params, fact, rng)
        hint = hinted_answer(user_turns[0] if user_turns else "")
        if hint is not None and rng.random() < (1 + params.skill) / 2:
            answer = hint
        return _malformed(rng) if malformed else _reasoning(fact, answer, rng) + f"\n\\boxed{{{answer}}}"

    previous = final_answer(assistant_turns[-1])
    # "\\boxed{answer}" in the instructions (the authors' prompts) shows the format, not an answer.
    others = [o for o in boxed_all(last_user) if o != "answer"]
    answer, how = _later_answer(model, params, fact, previous, others, rng)
    if malformed:
        return _malformed(rng)
    return f"{how}\n{_reasoning(fact, answer, rng)}\n\\boxed{{{answer}}}"


_HINT_LINE = re.compile(r"^[ \t]*hint\b.*$", re.IGNORECASE | re.MULTILINE)


def hinted_answer(text: str) -> str | None:
    """The answer a "Hint ..." line of the prompt gives in a non-empty \\boxed{}, else None."""
    for line in _HINT_LINE.findall(text):
        boxes = boxed_all(line)
        if boxes:
            return boxes[-1].strip() or None
    return None


def is_summary_request(text: str) -> bool:
    # "summar" alone could appear in a task prompt ("summarize your reasoning"); a summary
    # request also shows the agents' answers, or at least talks about the agents.
    lowered = text.lower()
    return "summar" in lowered and ("agent" in lowered or bool(boxed_all(text)))


def _first_answer(model: str, params: ModelParams, fact: Fact, rng) -> str:
    if fact.gold is None:
        return plausible_number(f"{model}|{fact.key}")
    if rng.random() < params.skill:
        return fact.gold
    wrong = wrong_answers(fact.gold, f"{model}|{fact.key}")
    return rng.choices(wrong, weights=_WRONG_WEIGHTS[: len(wrong)])[0]


def _later_answer(model: str, params: ModelParams, fact: Fact, previous: str | None, others: list[str], rng):
    # Draw every random number up front, in a fixed order, so one branch never shifts another.
    fresh = _first_answer(model, params, fact, rng)
    adopt_roll, correct_roll, tie_roll = rng.random(), rng.random(), rng.random()
    own = previous if previous is not None else fresh
    answer, how = own, "After reading the other agents' answers, I keep my answer."
    if others:
        counts = Counter(normalize(o) for o in others)
        top = max(counts.values())
        tied = [o for o in dict.fromkeys(others) if counts[normalize(o)] == top]
        majority = tied[int(tie_roll * len(tied))]
        if normalize(majority) != normalize(own) and adopt_roll < params.persuadability:
            answer, how = majority, "The other agents mostly agree on a different answer; I adopt it."
        gold = fact.gold
        if (
            gold is not None
            and normalize(answer) != normalize(gold)
            and any(normalize(o) == normalize(gold) for o in others)
            and correct_roll < params.correction
        ):
            answer, how = gold, "Checking another agent's reasoning, I see my mistake and correct my answer."
    return answer, how


_OPENERS = (
    "Let me work through this step by step.",
    "I will solve this carefully.",
    "Let's reason about this problem.",
    "Breaking the problem into parts:",
)
_MIDDLES = (
    "I combine the intermediate results in order.",
    "Putting the pieces together gives the result.",
    "Carrying the computation through to the end:",
    "Checking each step once more before concluding.",
)


def _reasoning(fact: Fact, answer: str, rng) -> str:
    lines = [rng.choice(_OPENERS)]
    if fact.kind == "arithmetic" and fact.detail:
        lines.append(f"The products are {fact.detail}.")
    lines.append(rng.choice(_MIDDLES))
    lines.append(f"So the final answer is {answer}.")
    return "\n".join(lines)


def _malformed(rng) -> str:
    # No box and no trailing number: an answer the harness must count as unparseable.
    return rng.choice(
        (
            "I am not sure how to finish this one; the steps above do not settle it.",
            "This needs more thought than I can give it here, so I leave it open.",
            "Several approaches seem possible and I cannot decide between them.",
        )
    )


_SUMMARY_REASONS = (
    "reasoning that the intermediate results combine directly",
    "after working through the problem step by step",
    "checking each step along the way",
    "by breaking the problem into parts",
)


def summarize(text: str, rng) -> str:
    answers = boxed_all(text)
    if not answers:
        return "None of the agents gave a clear final answer."
    return "\n".join(f"One agent answered \\boxed{{{a}}}, {rng.choice(_SUMMARY_REASONS)}." for a in answers)


def estimate_tokens(text: str) -> int:
    """Token count estimate (the simulator has no tokenizer): about four characters a token."""
    return len(text) // 4 + 1


def prompt_tokens(messages: Sequence[dict]) -> int:
    # A few tokens of per-message overhead, as chat formats add role markers.
    return sum(estimate_tokens(_text(m.get("content"))) + 3 for m in messages)


def message_text(content: object) -> str:
    return _text(content)
