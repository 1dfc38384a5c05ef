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
from harness.llm.pricing import BATCH_SHARE, cost_usd, training_price_for
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
    # The same stage with endpoint.batch (debates through the Batch API at batch price; other
    # stages are not batched), and how many batches it waits for one after another.
    batch_cost_usd: float | None = None
    batch_waves: int = 0


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
                        note=f"debates: {n} agents x {rounds} rounds ({cfg.debate.mode})",
                        batch_cost_usd=None if cost is None else cost * BATCH_SHARE,
                        # each round, and each round's summaries, is one batch (per model) to wait for
                        batch_waves=(2 * rounds - 1 if cfg.debate.mode == "summarize" else rounds) if problems else 0)
    return est, gen_tokens // k, conv_tokens // k


def estimate_plan(cfg: RunConfig, train: Sequence[Problem], test: Sequence[Problem]) -> list[StageEstimate]:
    prompts = Prompts(cfg.task.name, cfg.task.prompts_dir, cfg.task.prompt_set)
    base = cfg.models.base
    # After iteration 0 the agents are finetuned models; price their calls as such where known.
    tuned = f"ft:{base}:org:plan:0" if cfg.finetune.provider == "openai" else base
    if cfg.finetune.provider == "azure":
        from harness.llm.azure_pricing import inference_model

        tuned = inference_model(cfg.finetune.azure.base_model or base)  # a deployment of a finetuned model
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
        endpoints = None
        if cfg.finetune.provider == "local":
            kind = "full-finetuning" if cfg.finetune.local.full_finetune else "LoRA"
            ft_cost, note = 0.0, f"local {kind} jobs: your own compute, no per-token charge"
        elif cfg.finetune.provider == "together":
            ft_cost, note, endpoints = _together_finetune(cfg, trained, jobs, examples)
        elif cfg.finetune.provider == "azure":
            from harness.llm.azure_pricing import azure_plan_note, azure_training_price

            price = azure_training_price(cfg.finetune.azure.base_model or base, cfg.prices)
            ft_cost = None if price is None else trained * price / 1e6
            note = azure_plan_note(cfg, jobs)
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
        if endpoints is not None:
            stages.append(StageEstimate(stage=f"iter {k + 1}: {jobs} dedicated endpoint{'s' if jobs > 1 else ''}",
                                        calls=0, prompt_tokens=0, completion_tokens=0, cost_usd=endpoints.usd,
                                        note=endpoints.note))
    for s in stages:
        if not s.batch_waves:
            s.batch_cost_usd = s.cost_usd
    return stages


def _together_finetune(cfg: RunConfig, trained: int, jobs: int, examples: int):
    """Together: the LoRA (or full) training rate of the base's size bracket, and the dedicated
    endpoints the finetunes need where Together does not serve them serverless."""
    from harness.errors import ConfigError
    from harness.llm import pricing_together as tp
    from harness.providers.together_settings import together_epochs_error

    problem = together_epochs_error(cfg.finetune.hyperparameters.n_epochs)
    if problem:
        raise ConfigError(f"{problem}; Together would refuse every job")
    settings = cfg.finetune.together
    base = settings.model or cfg.models.base
    simulated = cfg.endpoint.kind == "simulator"
    # The simulator's models stand in for small ones: the smallest bracket's rate, served per token.
    price = (tp.TRAINING_BRACKETS[0][1 if settings.lora else 2] if simulated
             else tp.training_price(base, settings.lora))
    cost = None if price is None else trained * price / 1e6
    kind = "LoRA" if settings.lora else "full"
    note = (f"Together {kind} finetuning at ${price}/1M training tokens, ~{examples} examples per model, "
            f"{cfg.finetune.hyperparameters.n_epochs} epochs" if price is not None else
            f"Together finetuning: the size of {base} is unknown (set prices.{base}.training)")
    override = cfg.prices.get(base, {}) if isinstance(cfg.prices.get(base), dict) else {}
    if override.get("training") is not None:
        cost = trained * float(override["training"]) / 1e6
    endpoints = None
    if not simulated and tp.needs_dedicated_endpoint(base, settings.lora, settings.serverless_lora_models):
        endpoints = tp.endpoint_cost(jobs, settings.dedicated_endpoint_usd_per_hour,
                                     settings.dedicated_endpoint_hours_per_iteration)
    return cost, note, endpoints


def batch_wait_note(cfg: RunConfig, stages: Sequence[StageEstimate]) -> str:
    """The expected wait of a run with endpoint.batch: the batches it waits for one after another."""
    waves = sum(s.batch_waves for s in stages)
    if cfg.endpoint.kind == "simulator":
        each = f"{cfg.endpoint.simulator.batch_seconds:g} s each (endpoint.simulator.batch_seconds)"
        return f"endpoint.batch: expected wait {waves} rounds of batches one after another, {each}"
    window = cfg.endpoint.batch_settings.completion_window
    return (f"endpoint.batch: expected wait {waves} rounds of batches one after another (a debate round, or its "
            f"summaries, is one batch per model); each finishes within its {window} completion window, often much "
            f"sooner, but OpenAI promises only the window: worst case {waves} x {window}")


def plan_table(stages: Sequence[StageEstimate], simulated: bool) -> Table:
    title = "Plan (--dry-run: nothing is called)" + (" · simulated prices" if simulated else "")
    notes = sorted({s.note for s in stages if s.note})
    caption = (f"assumes ~{ANSWER_TOKENS} tokens per answer, {SUMMARY_TOKENS} per summary, "
               f"{int(AGREE_SHARE * 100)}% of answers agreeing with the vote; " + "; ".join(notes))
    table = Table(title=title, caption=caption)
    for col in ("stage", "calls", "tokens in", "tokens out", "cost (USD)", "with batch (USD)"):
        table.add_column(col, justify="left" if col == "stage" else "right", no_wrap=col == "stage")
    total: float | None = 0.0
    batch_total: float | None = 0.0
    for s in stages:
        total = None if total is None or s.cost_usd is None else total + s.cost_usd
        batch_total = None if batch_total is None or s.batch_cost_usd is None else batch_total + s.batch_cost_usd
        table.add_row(s.stage, f"{s.calls:,}", f"{s.prompt_tokens:,}", f"{s.completion_tokens:,}",
                      _usd(s.cost_usd), _usd(s.batch_cost_usd))
    table.add_row("total", f"{sum(s.calls for s in stages):,}", f"{sum(s.prompt_tokens for s in stages):,}",
                  f"{sum(s.completion_tokens for s in stages):,}", _usd(total), _usd(batch_total), style="bold")
    return table


def _usd(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.4f}"
