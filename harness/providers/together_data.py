"""Our training files (OpenAI chat JSONL) in the form Together's fine-tuning accepts.

Together's conversational format (docs.together.ai, "Data preparation", checked 2026-12-05):
each line holds `messages`; a conversation starts with a system or user message, then user and
assistant alternate; roles are system, user, assistant. A message may carry `weight`, 0 or 1
only (0 masks its tokens from the loss). When ANY message of a file has a weight, Together
turns `train_on_inputs` on, so an unweighted user message would then be trained on.

Our critic examples carry `"weight": 0` on the first (possibly wrong) assistant turn. So that
exactly the intended tokens carry loss, a file with any weight is sent with an explicit weight
on EVERY message: 0 on system and user turns, the assistant turn's own weight (default 1)
elsewhere. A file without weights is sent unchanged (Together trains on the assistant turns).
Anything Together would train wrongly on, or reject, is refused here with the line named:
a weight other than 0 or 1, a weight on a non-assistant turn, a conversation out of order, or
an example whose every assistant turn is masked (it would teach nothing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from harness.errors import FinetuneError

_ROLES = ("system", "user", "assistant")


@dataclass
class TogetherData:
    content: bytes  # the JSONL to upload
    weighted: bool  # per-turn weights were written (train_on_inputs must be true)
    examples: int


def _refuse(path: Path, line: int, why: str) -> FinetuneError:
    return FinetuneError(f"{path}, line {line}: {why}; Together's conversational format cannot carry it, so nothing "
                         f"was uploaded (rebuild the data, or set finetune.critic_first_turn_loss: true to train on "
                         f"every assistant turn)")


def _check(path: Path, line: int, messages: object) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _refuse(path, line, "no 'messages' list")
    expected = "user"
    for k, msg in enumerate(messages, start=1):
        if not isinstance(msg, dict) or msg.get("role") not in _ROLES:
            raise _refuse(path, line, f"message {k} has role {msg.get('role') if isinstance(msg, dict) else msg!r}; "
                                      f"Together accepts {', '.join(_ROLES)}")
        role = msg["role"]
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise _refuse(path, line, f"message {k} ({role}) has no text content")
        if role == "system":
            if k != 1:
                raise _refuse(path, line, f"message {k} is a system message after the first")
            continue
        if role != expected:
            raise _refuse(path, line, f"message {k} is {role} where {expected} must come (a conversation starts "
                                      f"with system or user, then user and assistant alternate)")
        expected = "assistant" if role == "user" else "user"
        if "weight" in msg:
            weight = msg["weight"]
            if role != "assistant":
                raise _refuse(path, line, f"message {k} ({role}) carries a weight; ours go on assistant turns only")
            if isinstance(weight, bool) or weight not in (0, 1):
                raise _refuse(path, line, f"message {k} has weight {weight!r}; Together supports only 0 and 1")
    if messages[-1]["role"] != "assistant":
        raise _refuse(path, line, "the conversation does not end with an assistant message")
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        raise _refuse(path, line, "every assistant turn has weight 0, so the example would teach nothing")
    return messages


def together_training_data(path: Path) -> TogetherData:
    """The file at `path` as Together should receive it (see the module docstring)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise FinetuneError(f"cannot read training file {path}: {e}") from None
    rows: list[tuple[int, list[dict]]] = []
    for i, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _refuse(path, i, f"not JSON ({e.msg})") from None
        rows.append((i, _check(path, i, row.get("messages") if isinstance(row, dict) else None)))
    weighted = any("weight" in m for _, messages in rows for m in messages)
    out = []
    for _, messages in rows:
        if weighted:
            messages = [{"role": m["role"], "content": m["content"],
                         "weight": int(m.get("weight", 1)) if m["role"] == "assistant" else 0} for m in messages]
        else:
            messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        out.append(json.dumps({"messages": messages}, ensure_ascii=False))
    return TogetherData(content=("\n".join(out) + "\n").encode("utf-8") if out else b"", weighted=weighted,
                        examples=len(out))
