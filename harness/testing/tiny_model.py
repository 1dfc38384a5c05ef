"""Build a tiny random Llama model with its own tokenizer and chat template, offline, in seconds.

It exercises the open-model path end to end (LoRA training, vLLM serving, adapters routed per
agent) where no real model can be downloaded. Its answers are noise: tests built on it check
plumbing, never accuracy. Needs the `local` extra (torch, transformers, tokenizers).

    python -m harness.testing.tiny_model OUT_DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# Role markers and end of turn are single special tokens so the chat template's structure never
# merges with content under BPE, which keeps the per-turn loss masks exact.
SPECIAL_TOKENS = ["<|bos|>", "<|end|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_CORPUS = [
    "What is 3+4*5+6-7*8? Let's think step by step. 4*5 = 20 and 7*8 = 56.",
    "So 3 + 20 + 6 - 56 = -27. The answer is \\boxed{-27}.",
    "Here are the other agents' answers. Re-examine your reasoning and give an updated answer.",
    "The final answer is 42. Natalia sold clips to 48 of her friends in April.",
    "Solve for x: 2x + 3 = 11, so x = 4. Therefore \\boxed{4}.",
    "0123456789 + - * / = ( ) { } [ ] \\ . , ; : ! ? ' \" abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ the of and to in is that for it as was with be by on not",
]


def build_tiny_model(out_dir: Path | str, *, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised LlamaForCausalLM (~0.4 M parameters) to
    `out_dir`; returns the directory. hidden_size 128 with 2 heads gives head_dim 64, the smallest
    that vLLM's CPU attention kernel accepts."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_CORPUS, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|end|>",
                                  pad_token="<|pad|>", additional_special_tokens=SPECIAL_TOKENS[3:])
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    return out


def write_chat_jsonl(path: Path | str, n: int = 20, *, first_turn_weight: int = 0) -> Path:
    """A small critic-style chat file: task, a first answer (with `weight` on it), the other
    agents' answers, an updated answer. Enough to train the tiny model for a few steps."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            a, b, c = i % 7, (3 * i) % 11, (5 * i) % 13
            answer = a + b * c
            messages = [
                {"role": "user", "content": f"What is {a}+{b}*{c}? Put the final answer in \\boxed{{}}."},
                {"role": "assistant", "content": f"{b}*{c} = {b * c}. So the answer is \\boxed{{{answer + 1}}}.",
                 "weight": first_turn_weight},
                {"role": "user", "content": f"Other agents answered \\boxed{{{answer}}}. Give an updated answer."},
                {"role": "assistant", "content": f"{a} + {b * c} = {answer}. The answer is \\boxed{{{answer}}}."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    print(build_tiny_model(args.out_dir))


if __name__ == "__main__":
    main()
