"""A chat example as token ids and labels, with loss only on the assistant turns of weight 1: the
tokenization every local trainer shares (local_train, resident_train, tinker_train). No
training library is imported here; the tokenizer comes from the caller.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

IGNORE = -100  # label of tokens that carry no loss (PyTorch's cross-entropy ignore_index)


def _label_spans(tokenizer: Any, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels of the whole conversation, untruncated (see tokenize_weighted)."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]

    def render(msgs: list[dict], gen: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    full = render(plain)
    # The template already holds BOS and role markers; adding special tokens again would double BOS.
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        start_text, end_text = render(plain[:i], gen=True), render(plain[: i + 1])
        start, end = len(start_text), len(end_text)
        if not full.startswith(end_text):
            # Templates such as Phi-3's close a conversation that does not end in a generation
            # prompt with an extra marker (eos), so a partial render is not a prefix of the full
            # one. The turn then ends where the two renders part. Compared character by
            # character they may agree on the first characters of two different special tokens
            # ("<|" of "<|endoftext|>" and "<|user|>"), so the end moves back to the start of a
            # token it would otherwise cut: a next turn's marker must never carry loss.
            end = len(os.path.commonprefix([end_text, full]))
            end = next((a for a, b in offsets if a < end < b), end)
        if not full.startswith(start_text) or end <= start:
            raise ValueError("the model's chat template renders earlier turns differently once later turns "
                             "follow, so per-turn loss masks cannot be located; use a model whose template "
                             "is prefix-stable")
        spans.append((start, end))
    labels = [tid if any(a < e and b > s for s, e in spans) else IGNORE for tid, (a, b) in zip(ids, offsets)]
    return ids, labels


def _fit(ids: list[int], labels: list[int], max_length: int | None) -> tuple[dict | None, str | None]:
    """(example, None), or (None, why it is dropped): "unweighted" (nothing to learn) or
    "too_long" (max_length would cut a weighted turn)."""
    if all(label == IGNORE for label in labels):
        return None, "unweighted"
    if max_length is not None and len(ids) > max_length:
        # A turn cut before its end-of-turn marker would teach the model to run on without
        # stopping, and a turn cut away entirely leaves a conversation without its point (a
        # critic's updated answer): such an example is dropped, not silently shortened.
        if any(label != IGNORE for label in labels[max_length:]):
            return None, "too_long"
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}, None


def tokenize_weighted(tokenizer: Any, messages: list[dict], max_length: int | None = None) -> dict | None:
    """Token ids and labels of one chat example, with loss only on assistant turns of weight 1.

    TRL's own `assistant_only_loss` cannot express this: it masks every assistant turn alike, and
    only for chat templates carrying `{% generation %}` markers, which most hub models' templates
    lack. So the whole conversation is rendered once with the model's template, each assistant
    turn's character span is found by rendering the prefix up to it (with the generation prompt)
    and through it, and a token is labelled iff it overlaps a weight-1 turn's span. The span
    includes the template's end-of-turn marker, so the model also learns where to stop. Returns
    None when nothing is left to learn (all turns weight 0), or when max_length would cut into a
    weight-1 turn (the example is dropped rather than taught without its end)."""
    return _fit(*_label_spans(tokenizer, messages), max_length)[0]


def read_examples(path: Path, tokenizer: Any, max_length: int) -> tuple[list[dict], int]:
    """The training examples of a chat JSONL and how many were dropped because max_length would
    cut a weighted turn. Each skipped line is reported on stdout (the job's train.log); raises
    ValueError saying why when no example is left."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training file {path} does not exist")
    examples: list[dict] = []
    too_long: list[int] = []  # token counts of the dropped examples
    unweighted = 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                messages = json.loads(line)["messages"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with 'messages' ({e})") from e
            ids, labels = _label_spans(tokenizer, messages)
            example, why = _fit(ids, labels, max_length)
            if example is not None:
                examples.append(example)
            elif why == "too_long":
                too_long.append(len(ids))
                print(f"warning: {path}:{n}: dropped: {len(ids)} tokens, and max_length {max_length} would cut "
                      f"a weight-1 assistant turn before its end", flush=True)
            else:
                unweighted += 1
                print(f"{path}:{n}: no weight-1 assistant turn; skipped", flush=True)
    if too_long:
        print(f"warning: {len(too_long)} of {len(examples) + len(too_long) + unweighted} examples dropped as longer "
              f"than max_length {max_length} (finetune.local.max_length)", flush=True)
    if not examples:
        if too_long:
            raise ValueError(f"{path}: nothing left to train on: {len(too_long)} example(s) need more than "
                             f"finetune.local.max_length={max_length} tokens (the longest {max(too_long)}) and "
                             f"{unweighted} have no weight-1 assistant turn; raise finetune.local.max_length")
        raise ValueError(f"{path}: no example with a weight-1 assistant turn to train on")
    return examples, len(too_long)


def load_examples(path: Path, tokenizer: Any, max_length: int) -> list[dict]:
    return read_examples(path, tokenizer, max_length)[0]
