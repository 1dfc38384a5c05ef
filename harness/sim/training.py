"""Simulated finetuning: validate a chat-format training file the way OpenAI does, and derive
the finetuned model's parameters from it by a fixed rule.

The rule (deterministic; documented because simulated results depend on it):

* Each example is graded by the simulator's own knowledge: the problem is read from the
  example's first user message (as for a chat request) and the final answer from its last
  assistant message. Examples about unknown questions are not graded.
* q = share of graded examples whose final answer is correct; n = number of examples;
  strength s = min(1, n / 50).
* New skill = parent skill + 0.5 * s * (q - parent skill): training moves a model halfway
  towards the quality of its data. Clean data (q = 1) gives p + 0.5 (1 - p) at 50+ examples;
  data worse than the model (q < p) makes it worse.
* Critic-style examples (more than one assistant turn) teach correction: with q_c their share
  with a correct final answer and s_c = min(1, n_critic / 50), new correction =
  correction + 0.5 * s_c * (q_c - correction). Files without such examples keep the parent's.
* Persuadability is inherited. With no graded example the parent's parameters are kept.
* A finetuned model's wrong answers are its own (they are keyed by its name), so agents
  finetuned on different data make different mistakes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from harness.sim.knowledge import Knowledge, final_answer, same
from harness.sim.models import ModelParams, estimate_tokens, message_text

MIN_EXAMPLES = 10  # OpenAI's minimum for a fine-tuning file
_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class TrainingFileError(ValueError):
    """A training file OpenAI would reject; the message names the line."""


@dataclass
class TrainingData:
    examples: list[list[dict]]  # the messages of each example
    tokens: int  # estimated tokens of one epoch


def parse_training_file(content: bytes) -> TrainingData:
    """Check a chat-format JSONL training file; raise TrainingFileError naming the first bad line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TrainingFileError(f"the file is not UTF-8 text (byte {e.start})") from None
    examples: list[list[dict]] = []
    tokens = 0
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingFileError(f"line {i}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TrainingFileError(f"line {i}: expected a JSON object with a 'messages' list")
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise TrainingFileError(f"line {i}: missing 'messages' (a non-empty list of messages)")
        has_assistant = False
        for k, msg in enumerate(messages, start=1):
            if not isinstance(msg, dict):
                raise TrainingFileError(f"line {i}, message {k}: expected an object with 'role' and 'content'")
            role = msg.get("role")
            if role not in _ROLES:
                raise TrainingFileError(f"line {i}, message {k}: unrecognized role {role!r}")
            content = msg.get("content")
            if content is not None and not isinstance(content, (str, list)):
                raise TrainingFileError(f"line {i}, message {k}: 'content' must be a string")
            weight = msg.get("weight")
            if weight is not None and (role != "assistant" or weight not in (0, 1)):
                raise TrainingFileError(f"line {i}, message {k}: 'weight' must be 0 or 1, on assistant messages only")
            if role == "assistant":
                has_assistant = True
                if not message_text(content).strip() and not msg.get("tool_calls"):
                    raise TrainingFileError(f"line {i}, message {k}: assistant message has empty content")
            tokens += estimate_tokens(message_text(content)) + 3
        if not has_assistant:
            raise TrainingFileError(f"line {i}: example has no assistant message")
        examples.append(messages)
    if len(examples) < MIN_EXAMPLES:
        raise TrainingFileError(
            f"the file has {len(examples)} example(s), but must have at least {MIN_EXAMPLES} examples"
        )
    return TrainingData(examples=examples, tokens=tokens)


def _move(value: float, target: float, strength: float) -> float:
    return min(1.0, max(0.0, value + 0.5 * strength * (target - value)))


def derive_params(parent_name: str, parent: ModelParams, data: TrainingData, knowledge: Knowledge) -> ModelParams:
    """The finetuned model's parameters (the rule in the module docstring)."""
    graded = correct = critic_graded = critic_correct = critic_n = 0
    for messages in data.examples:
        users = [message_text(m.get("content")) for m in messages if m.get("role") == "user"]
        assistants = [message_text(m.get("content")) for m in messages if m.get("role") == "assistant"]
        multi = len(assistants) > 1
        critic_n += multi
        fact = knowledge.lookup(users[0] if users else "")
        if fact.gold is None:
            continue
        ok = same(final_answer(assistants[-1]), fact.gold)
        graded += 1
        correct += ok
        if multi:
            critic_graded += 1
            critic_correct += ok
    n = len(data.examples)
    if graded == 0:
        return parent.model_copy(update={"parent": parent_name, "note": f"no gradable example among {n}: parameters kept"})
    q = correct / graded
    s = min(1.0, n / 50)
    skill = _move(parent.skill, q, s)
    correction = parent.correction
    note = f"n={n}, graded={graded}, q={q:.3f}, s={s:.2f}: skill {parent.skill:.3f} -> {skill:.3f}"
    if critic_graded:
        q_c = critic_correct / critic_graded
        s_c = min(1.0, critic_n / 50)
        correction = _move(parent.correction, q_c, s_c)
        note += f"; critic examples={critic_n}, q_c={q_c:.3f}: correction {parent.correction:.3f} -> {correction:.3f}"
    return ModelParams(
        skill=skill, persuadability=parent.persuadability, correction=correction, parent=parent_name, note=note
    )
