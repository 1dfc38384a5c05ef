"""`--dry-run`: the plan of a run with estimated calls, tokens and cost per stage. Calls nothing.

Estimates are deliberately simple and say what they assume: prompt tokens ~ characters / 4,
an answer of `ANSWER_TOKENS` (capped by sampling.max_tokens), a summary of `SUMMARY_TOKENS`,
and a share `AGREE_SHARE` of agents agreeing with the vote (which sizes the finetuning data).
"""

from __future__ import annotations

from typing import Sequence

from pydantic import BaseModel
from rich.table import Table

from harness.config import RunConfig
from harness.llm.pricing import cost_usd, training_price_for
from harness.prompts import Prompts
from harness.records import Problem

ANSWER_TOKENS = 300
SUMMARY_TOKENS = 200
AGREE_SHARE = 0.7


class StageEstimate(BaseModel):
    stage: str
    calls: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None  # None: a model's price is unknown
    note: str = ""


def _tokens(text: str) -> int:
    return len(text) // 4 + 1


def _debate_estimate(cfg: RunConfig, prompts: Prompts, problems: Sequence[Problem], stage: str,
                     generator: str, critic: str, n: int, rounds: int) -> tuple[StageEstimate, int, int]:
    """Returns the estimate and the mean tokens of one generator example and one conversation."""
    answer = min(ANSWER_TOKENS, cfg.sampling.max_tokens)
    calls = prompt = completion = 0
    cost: float | None = 0.0
    gen_tokens = conv_tokens = 0
    for p in problems:
        history = _tokens(prompts.question(p.question))
        gen_tokens += history + answer
        calls += n
        prompt += n * history
        completion += n * answer
        c = cost_usd(generator, n * history, 0, n * answer, cfg.prices)
        for _ in range(1, rounds):
            history += answer
            if cfg.debate.mode == "summarize":
                summ_prompt = _tokens(p.question) + (n - 1) * answer + 60
                calls += n
                prompt += n * summ_prompt
                completion += n * SUMMARY_TOKENS
                sc = cost_usd(cfg.summarizer, n * summ_prompt, 0, n * SUMMARY_TOKENS, cfg.prices)
                c = None if c is None or sc is None else c + sc
                history += SUMMARY_TOKENS + 60
            else:
                history += (n - 1) * (answer + 5) + 60
            calls += n
            prompt += n * history
            completion += n * answer
            cc = cost_usd(critic, n * history, 0, n * answer, cfg.prices)
            c = None if c is None or cc is None else c + cc
        conv_tokens += history + answer
        cost = None if cost is None or c is None else cost + c
    k = max(len(problems), 1)
    est = StageEstimate(stage=stage, calls=calls, prompt_tokens=prompt, completion_tokens=completion, cost_usd=cost,
                        note=f"debates: {n} agents x {rounds} rounds ({cfg.debate.mode})")
    return est, gen_tokens // k, conv_tokens // k


def estimate_plan(cfg: RunConfig, train: Sequence[Problem], test: Sequence[Problem]) -> list[StageEstimate]:
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir, cfg.task.prompt_set)
    base = cfg.models.base
    # After iteration 0 the agents are finetuned models; price their calls as such where known.
    tuned = f"ft:{base}:org:plan:0" if cfg.finetune.provider == "openai" else base
    stages: list[StageEstimate] = []
    for k in range(cfg.finetune.iterations + 1):
        model = base if k == 0 else tuned
        est, _, _ = _debate_estimate(cfg, prompts, test, f"iter {k}: debate test", model, model,
                                     cfg.test_agents, cfg.test_rounds)
        stages.append(est)
        if k == cfg.finetune.iterations:
            break
        n, rounds = cfg.debate.agents, cfg.debate.rounds
        est, gen_tokens, conv_tokens = _debate_estimate(cfg, prompts, train, f"iter {k}: debate train", model, model,
                                                        n, rounds)
        stages.append(est)
        if cfg.finetune.selection == "star":  # the wrong answers are asked again with a gold hint
            wrong = int(len(train) * n * (1 - AGREE_SHARE))
            hint_prompt = gen_tokens - min(ANSWER_TOKENS, cfg.sampling.max_tokens) + 40
            answer = min(ANSWER_TOKENS, cfg.sampling.max_tokens)
            stages.append(StageEstimate(stage=f"iter {k}: STaR rationalize", calls=wrong,
                                        prompt_tokens=wrong * hint_prompt, completion_tokens=wrong * answer,
                                        cost_usd=cost_usd(model, wrong * hint_prompt, 0, wrong * answer, cfg.prices),
                                        note="STaR: wrong answers retried with a gold hint"))
        # The same jobs the finetune stage runs: critics only when there are later rounds and they
        # are trained, and ONE model on every agent's pooled examples with finetune.single_model.
        critics = rounds > 1 and cfg.finetune.train_critics
        examples = int(len(train) * AGREE_SHARE)
        tokens_per_example = gen_tokens + (conv_tokens if critics else 0)
        jobs = 1 if cfg.finetune.single_model else n * (2 if critics else 1)
        trained = cfg.finetune.hyperparameters.n_epochs * n * examples * tokens_per_example
        if cfg.finetune.provider == "local":
            ft_cost, note = 0.0, "local LoRA jobs: your own compute, no per-token charge"
        elif cfg.finetune.provider == "tinker":
            from harness.providers.tinker_settings import tinker_training_cost

            ft_cost, note = tinker_training_cost(cfg.finetune.tinker, trained, cfg.prices)
        else:
            price = training_price_for(base, cfg.prices)
            ft_cost = None if price is None else trained * price / 1e6
            per_model = examples * (n if cfg.finetune.single_model else 1)
            note = f"finetuning: ~{per_model} examples per model, {cfg.finetune.hyperparameters.n_epochs} epochs"
        stages.append(StageEstimate(stage=f"iter {k}: finetune {jobs} model{'s' if jobs > 1 else ''}", calls=jobs,
                                    prompt_tokens=trained,
                                    completion_tokens=0, cost_usd=ft_cost, note=note))
    return stages


def plan_table(stages: Sequence[StageEstimate], simulated: bool) -> Table:
    title = "Plan (--dry-run: nothing is called)" + (" · simulated prices" if simulated else "")
    notes = sorted({s.note for s in stages if s.note})
    caption = (f"assumes ~{ANSWER_TOKENS} tokens per answer, {SUMMARY_TOKENS} per summary, "
               f"{int(AGREE_SHARE * 100)}% of answers agreeing with the vote; " + "; ".join(notes))
    table = Table(title=title, caption=caption)
    for col in ("stage", "calls", "tokens in", "tokens out", "cost (USD)"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col == "stage")
    total: float | None = 0.0
    for s in stages:
        total = None if total is None or s.cost_usd is None else total + s.cost_usd
        table.add_row(s.stage, f"{s.calls:,}", f"{s.prompt_tokens:,}", f"{s.completion_tokens:,}",
                      "unknown" if s.cost_usd is None else f"{s.cost_usd:.4f}")
    table.add_row("total", f"{sum(s.calls for s in stages):,}", f"{sum(s.prompt_tokens for s in stages):,}",
                  f"{sum(s.completion_tokens for s in stages):,}", "unknown" if total is None else f"{total:.4f}",
                  style="bold")
    return table
