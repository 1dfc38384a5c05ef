"""Prompt log-probabilities computed here with transformers + PEFT, from the base weights and the
LoRA adapters the `local` provider saved: the likelihood measures (logprobs.py) without a server.

`LocalLogprobs.prompt_logprobs` answers what `LLMClient.prompt_logprobs` answers from vLLM (the
chat template renders the conversation, each token gets the log-probability the model gives it
after the tokens before it, None for the first), so `logprobs.Scorer` and every measure built on
it are the same code on either backend. Why a second backend: vLLM's CPU build crashed scoring
adapters (see the vllm-tiny preset), and a run whose endpoint gives no log-probabilities (the
simulator, OpenAI) may still have trained local adapters. One model is in memory at a time
(the base, with each adapter attached on first use and switched per request); requests run one
at a time in a worker thread, so the event loop stays free.

Which backend a run uses is `analysis.likelihood_backend` (see `likelihood_backend`).
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Iterable, Mapping

from harness.errors import LogprobsUnavailable
from harness.llm.client import PromptLogprobs
from harness.records import Message, SampleId


def likelihood_backend(cfg) -> tuple[str | None, str]:
    """(backend, why) for a RunConfig: "vllm", "transformers", or None when the measures are off
    or cannot be computed (`why` then says what to change)."""
    a = cfg.analysis
    if not a.likelihood:
        return None, "off (analysis.likelihood: false)"
    want = a.likelihood_backend
    if want == "auto":
        if cfg.endpoint.kind == "vllm":
            want = "vllm"
        elif cfg.finetune.provider == "local":
            want = "transformers"
        else:
            return None, (f"the {cfg.endpoint.kind} endpoint gives no prompt log-probabilities and no local weights "
                          f"are configured; use a vLLM endpoint, or the local provider with "
                          f"analysis.likelihood_backend=transformers")
    if want == "vllm" and cfg.endpoint.kind != "vllm":
        return None, (f"analysis.likelihood_backend is vllm but the endpoint is {cfg.endpoint.kind}, which gives no "
                      f"prompt log-probabilities; set analysis.likelihood_backend=transformers (local adapters) "
                      f"or auto")
    if want == "transformers" and cfg.finetune.provider == "local" and cfg.finetune.local.full_finetune:
        return None, ("analysis.likelihood_backend is transformers, which scores LoRA adapters in-process, but the "
                      "agents are fully finetuned models (finetune.local.full_finetune); their vLLM servers score "
                      "them: set analysis.likelihood_backend=vllm (or auto)")
    if want == "transformers" and cfg.finetune.provider != "local":
        return None, ("analysis.likelihood_backend is transformers, which scores the base weights and the local "
                      "provider's adapters, but finetune.provider is not local")
    return want, f"scored with {want}"


def likelihood_scorer(cfg, provider, records) -> tuple[bool, "LocalLogprobs | None", str]:
    """For the loop: (compute the measures?, the in-process scorer or None for the endpoint's,
    which backend or why none) for a RunConfig, its provider and the debate records to score."""
    backend, why = likelihood_backend(cfg)
    if backend != "transformers":
        return backend is not None, None, why
    try:
        return True, LocalLogprobs.for_run(cfg, provider, {m for r in records for t in r.agents for m in t.models}), why
    except LogprobsUnavailable as e:
        return False, None, str(e)


class LocalLogprobs:
    """s_M(y | c) for the base model and this run's adapters, in-process (see the module
    docstring). `adapters`: {model id: adapter directory}; `base_names`: the ids that mean the
    base model itself (its served name, its path, ...)."""

    def __init__(self, base_model_path: str, adapters: Mapping[str, str], base_names: Iterable[str], *,
                 device: str = "auto", threads: int | None = None):
        self.base_model_path = base_model_path
        self.adapters = dict(adapters)
        self.base_names = {n for n in base_names if n} | {base_model_path}
        self.device, self.threads = device, threads
        self._lock = threading.Lock()
        self._model = None
        self._tokenizer = None
        self._loaded: dict[str, str] = {}  # model id -> PEFT adapter name

    @classmethod
    def for_run(cls, cfg, provider, model_ids: Iterable[str]) -> "LocalLogprobs":
        """The run's base weights (finetune.local.base_model_path, else serve.model) and the
        adapters `provider` (a LocalProvider) trained under `model_ids`."""
        local = cfg.finetune.local
        named = local.base_model_path or cfg.serve.model
        if not named:
            raise LogprobsUnavailable("finetune.local.base_model_path (or serve.model) is not set: no base weights "
                                      "to score with")
        from harness.models import resolve

        ids = set(model_ids)
        adapters = provider.artifacts(ids) if provider is not None else {}
        return cls(resolve(named), adapters, {named, cfg.models.base, cfg.serve.served_name}, device=local.device,
                   threads=local.threads)

    # ------------------------------------------------------------------ the LLMClient shape

    async def prompt_logprobs(self, model: str, messages: list[Message] | list[dict], *, add_generation_prompt: bool,
                              sample: SampleId | None = None, purpose: str = "score") -> PromptLogprobs:
        return await asyncio.to_thread(self._score, model, self._dicts(messages), add_generation_prompt)

    @staticmethod
    def _dicts(messages: list[Message] | list[dict]) -> list[dict]:
        return [m.model_dump(include={"role", "content"}) if isinstance(m, Message) else
                {"role": m["role"], "content": m["content"]} for m in messages]

    async def prompt_token_ids(self, model: str, messages: list[Message] | list[dict], *,
                               add_generation_prompt: bool) -> list[int]:
        """The tokens `prompt_logprobs` would score, without running the model (every model here
        shares the base tokenizer)."""
        def tokens() -> list[int]:
            with self._lock:  # a fast tokenizer is not safe to call from two threads at once
                return self._tokens(self._dicts(messages), add_generation_prompt)

        return await asyncio.to_thread(tokens)

    async def aclose(self) -> None:
        self._model = None

    # ------------------------------------------------------------------ work (worker thread)

    def _score(self, model: str, msgs: list[dict], add_generation_prompt: bool) -> PromptLogprobs:
        with self._lock:
            import torch

            net = self._select(model)
            ids = self._tokens(msgs, add_generation_prompt)
            x = torch.tensor([ids], device=self._device_name)
            with torch.inference_mode():
                logits = net(input_ids=x).logits[0, :-1].float()
                picked = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:, None])[:, 0]
            return PromptLogprobs(token_ids=ids, logprobs=[None, *picked.tolist()])

    def _tokens(self, msgs: list[dict], add_generation_prompt: bool) -> list[int]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.base_model_path)
        ids = self._tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])  # a BatchEncoding in newer transformers

    def _select(self, model: str):
        """The network that answers for `model`: the base (adapters disabled) or an adapter."""
        self._ensure_loaded()
        if model in self.base_names:
            if self._loaded:
                self._model.base_model.disable_adapter_layers()
            return self._model
        path = self.adapters.get(model)
        if path is None:
            raise LogprobsUnavailable(f"{model!r} is neither the base model nor an adapter this run trained "
                                      f"(known: {', '.join(sorted(self.adapters)) or 'none'})")
        if not (Path(path) / "adapter_config.json").exists():
            raise LogprobsUnavailable(f"{model!r} ({path}) is not a LoRA adapter (a full finetune?): the "
                                      f"transformers backend scores adapters on the base weights only")
        from peft import PeftModel

        if model not in self._loaded:
            name = f"a{len(self._loaded)}"  # PEFT adapter names must be plain identifiers
            if not self._loaded:
                self._model = PeftModel.from_pretrained(self._model, path, adapter_name=name)
            else:
                self._model.load_adapter(path, adapter_name=name)
            self._model.eval()
            self._loaded[model] = name
        self._model.base_model.enable_adapter_layers()
        self._model.set_adapter(self._loaded[model])
        return self._model

    def _ensure_loaded(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM

        if self.threads:
            torch.set_num_threads(self.threads)
        cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        self._device_name = "cuda" if cuda else "cpu"
        # float32 on a CPU: many have no native bf16 (see the smollm2 preset's serve.dtype).
        dtype = "auto" if cuda else torch.float32
        self._model = AutoModelForCausalLM.from_pretrained(self.base_model_path, dtype=dtype).to(self._device_name)
        self._model.eval()


__all__ = ["LocalLogprobs", "likelihood_backend", "likelihood_scorer"]
