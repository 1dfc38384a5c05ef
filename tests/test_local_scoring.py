"""The likelihood measures computed in-process (transformers + PEFT on the saved adapters), on
the tiny random model built offline: the same numbers the vLLM path gives for the same
log-probabilities, and a trained adapter moves them away from the base model's."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("peft", reason="the `local` extra (torch, transformers, peft, trl) is not installed")

from fastapi import FastAPI, Request  # noqa: E402

from harness.config import Hyperparameters, LocalFinetuneConfig, load_config  # noqa: E402
from harness.diversity import compute_diversity  # noqa: E402
from harness.diversity.local_scoring import LocalLogprobs, likelihood_backend  # noqa: E402
from harness.providers.base import FinetuneRequest, JobStatus  # noqa: E402
from harness.providers.local import LocalProvider  # noqa: E402
from harness.records import Message  # noqa: E402
from harness.testing.tiny_model import build_tiny_model, write_chat_jsonl  # noqa: E402
from test_diversity import client_for, debate, serve  # noqa: E402

TEXTS = ["3*4 = 12. So the answer is \\boxed{12}.", "The answer is 42.", "4 + 20 = 24. The answer is \\boxed{24}."]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def vllm_serving(scorer: LocalLogprobs) -> FastAPI:
    """vLLM's prompt_logprobs answer (one entry per prompt token, None first) carrying the
    in-process scorer's numbers: the vLLM path then computes from exactly the same numbers."""
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        got = await scorer.prompt_logprobs(body["model"], body["messages"],
                                           add_generation_prompt=body["add_generation_prompt"])
        entries = [None if lp is None else {str(t): {"logprob": lp, "rank": 1, "decoded_token": "?"}}
                   for t, lp in zip(got.token_ids, got.logprobs)]
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}, "finish_reason": "length"}],
                "prompt_logprobs": entries,
                "usage": {"prompt_tokens": len(got.token_ids), "completion_tokens": 1,
                          "total_tokens": len(got.token_ids) + 1}}

    return app


async def test_the_same_measures_as_the_vllm_path_and_a_hand_computed_nll(tiny_model, tmp_path):
    """Base model only (iteration 0): every measure equals what the vLLM path computes from the
    same log-probabilities, and the held-out NLL is the formula's -mean s_{C_i}(y_j | c_j)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    scorer = LocalLogprobs(str(tiny_model), {}, ["base"], device="cpu", threads=1)
    records = [debate(f"p{i}", TEXTS, ["base"] * 3) for i in range(2)]
    local = await compute_diversity(records, iteration=0, split="test", logprobs=True, base_model="base",
                                    scorer=scorer)
    with serve(vllm_serving(scorer)) as url:
        async with client_for(url, tmp_path, kind="vllm") as client:
            remote = await compute_diversity(records, iteration=0, split="test", client=client, logprobs=True,
                                             base_model="base")
    for field in ("heldout_critic_nll", "kl_between_generators", "kl_between_critics", "kl_generators_vs_base"):
        assert getattr(local, field) == pytest.approx(getattr(remote, field), abs=1e-9), field
    assert local.kl_between_critics == 0.0 and local.kl_generators_vs_base == 0.0  # one model: no divergence

    # By hand: each reply's mean log-probability as the model's own loss over the reply tokens.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    net = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()

    def s(context, reply):
        msgs = [{"role": m.role, "content": m.content} for m in context]
        prefix = len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
        ids = tok.apply_chat_template([*msgs, {"role": "assistant", "content": reply}], tokenize=True)["input_ids"]
        labels = torch.tensor([[-100] * prefix + ids[prefix:]])
        with torch.inference_mode():
            return -net(input_ids=torch.tensor([ids]), labels=labels).loss.item()

    per_problem = []
    for rec in records:  # final round: every agent's second reply, in its own conversation
        scores = [s(t.messages[:3], t.messages[3].content) for t in rec.agents]
        per_problem.append(sum(-scores[j] for i in range(3) for j in range(3) if i != j) / 6)
    assert local.heldout_critic_nll == pytest.approx(sum(per_problem) / len(per_problem), rel=1e-5)
    assert local.heldout_critic_nll > 0


def test_the_backend_follows_the_config():
    smollm2 = load_config("smollm2")
    assert smollm2.analysis.likelihood and likelihood_backend(smollm2)[0] == "transformers"
    assert likelihood_backend(load_config("vllm"))[0] == "vllm"  # auto on a vLLM endpoint
    assert likelihood_backend(load_config("vllm", ["endpoint.kind=openai", "analysis.likelihood_backend=auto",
                                                   "models.base=m"]))[0] == "transformers"  # local adapters
    backend, why = likelihood_backend(load_config("demo"))  # the simulator, OpenAI-style finetuning
    assert backend is None and "likelihood_backend=transformers" in why
    backend, why = likelihood_backend(load_config("demo", ["analysis.likelihood_backend=vllm"]))
    assert backend is None and "endpoint is simulator" in why
    assert likelihood_backend(load_config("vllm", ["analysis.likelihood=false"]))[0] is None


@pytest.mark.slow
async def test_a_trained_adapter_scores_differently_from_the_base(tiny_model, tmp_path):
    """Two quick LoRA jobs on the tiny model (agents 0 and 1), found through the provider as the
    loop finds them: the adapters give their replies a different NLL than the base model does, so
    the agents diverge from the base and from each other (KL != 0)."""
    provider = LocalProvider(tmp_path / "run", LocalFinetuneConfig(learning_rate=5e-3, device="cpu", threads=1),
                             base_model_path=str(tiny_model), base_names={"base"}, seed=0)
    names = []
    for agent in (0, 1):
        data = write_chat_jsonl(tmp_path / f"critic-{agent}.jsonl", n=8 + 8 * agent)
        state = await provider.submit(FinetuneRequest(
            training_file=data, base_model="base", hyperparameters=Hyperparameters(n_epochs=2, batch_size=4),
            metadata={"run": "t", "iteration": "1", "role": "critic", "agent": str(agent)}))
        done = await provider.wait(state.job_id, poll_interval_s=0.2)
        assert done.status == JobStatus.SUCCEEDED, done.error
        names.append(done.model_id)
    await provider.close()
    cfg = load_config("smollm2", [f"serve.model={tiny_model}", "finetune.local.threads=1", "finetune.local.device=cpu"])
    scorer = LocalLogprobs.for_run(cfg, provider, [*names, "base"])
    assert set(scorer.adapters) == set(names)

    replies = ["1 + 4 = 5. The answer is \\boxed{5}.", "2 + 6*3 = 20. The answer is \\boxed{20}."]  # training style
    trained = await compute_diversity([debate("p", replies, names)], iteration=1, split="test", logprobs=True,
                                      base_model="base", scorer=scorer)
    base = await compute_diversity([debate("p", replies, ["base", "base"])], iteration=0, split="test",
                                   logprobs=True, base_model="base", scorer=scorer)
    assert trained.heldout_critic_nll != pytest.approx(base.heldout_critic_nll, abs=1e-4)
    assert all(v != pytest.approx(0.0, abs=1e-4) for v in trained.kl_generators_vs_base_per_agent)
    assert base.kl_generators_vs_base == 0.0 and base.kl_between_critics == 0.0
    # The two agents' adapters are two models: the same conversation scores differently under each.
    conversation = [Message(role="user", content="What is 1+4?"), Message(role="assistant", content=replies[0])]
    a, b = [await scorer.prompt_logprobs(m, conversation, add_generation_prompt=False) for m in names]
    assert a.token_ids == b.token_ids and a.logprobs != pytest.approx(b.logprobs, abs=1e-4)
    assert trained.kl_between_critics != pytest.approx(0.0, abs=1e-5)
    # The base stays the base after adapters were used (adapters are switched off for it).
    again = await compute_diversity([debate("p", replies, ["base", "base"])], iteration=0, split="test",
                                    logprobs=True, base_model="base", scorer=scorer)
    assert again.heldout_critic_nll == pytest.approx(base.heldout_critic_nll, abs=1e-9)
    await scorer.aclose()
