"""The paper's baselines and ablations (§3.2, Tables 1-2): each method's selection rule on
hand-built debates, which models each one trains (counted on the simulator's side), STaR's
hinted retry against the simulator, and the presets and config rules that name them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import AsyncOpenAI
from records_factory import make_record
from rich.console import Console

from harness.config import EndpointConfig, FinetuneConfig, SamplingConfig, SimulatorConfig, load_config
from harness.debate import Debater, DebateSettings, Society, run_debates
from harness.errors import ConfigError
from harness.fileio import read_jsonl
from harness.finetune import FinetuneStage
from harness.ftdata import build_ftdata, build_star_ftdata, pool_one_model
from harness.llm import LLMClient
from harness.prompts import Prompts
from harness.providers.openai_ft import OpenAIFinetuneProvider
from harness.records import Message, Problem, Rationalization, UsageRecord
from harness.registry import Registry
from harness.sim import SimServer
from harness.sim.knowledge import Knowledge
from harness.sim.models import base_params, respond
from harness.star import hinted_messages, needs_rationalization, rationalize
from harness.tasks import get_task


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rationalization(pid: str, agent: int, reply_answer: str, gold: str) -> Rationalization:
    hint = f"problem {pid}\n\nHint: the correct final answer is \\boxed{{{gold}}}."
    return Rationalization(iteration=0, problem_id=pid, agent=agent, model="m",
                           messages=[Message(role="user", content=hint),
                                     Message(role="assistant", content=f"worked it out: \\boxed{{{reply_answer}}}")],
                           answer=reply_answer, correct=reply_answer == gold)


# ----------------------------------------------------------------------------- STaR

def test_star_keeps_gold_correct_answers_and_rationalizes_the_rest(tmp_path):
    recs = [
        make_record("right", "7", [["7"]]),  # kept as it is
        make_record("fixed", "5", [["3"]]),  # wrong; the hinted retry got 5: kept, without the hint
        make_record("still-wrong", "9", [["1"]]),  # wrong; the hinted retry got 2: dropped
        make_record("unparsed", "4", [[None]]),  # no answer; the hinted retry got 4: kept
        make_record("not-retried", "6", [["0"]]),  # wrong, no retry on record: dropped
    ]
    hints = [rationalization("fixed", 0, "5", "5"), rationalization("still-wrong", 0, "2", "9"),
             rationalization("unparsed", 0, "4", "4")]
    stats = build_star_ftdata(recs, hints, n_agents=1, cfg=FinetuneConfig(selection="star"), out_dir=tmp_path, seed=0)
    examples = rows(tmp_path / "generator-0.jsonl")
    assert [ex["messages"][0]["content"] for ex in examples] == ["problem right", "problem fixed", "problem unparsed"]
    assert examples[0]["messages"][1]["content"] == "agent 0 round 0: \\boxed{7}"  # its own answer
    assert examples[1]["messages"][1]["content"] == "worked it out: \\boxed{5}"  # the rationalized answer
    assert not any("Hint" in m["content"] for ex in examples for m in ex["messages"])
    assert rows(tmp_path / "critic-0.jsonl") == []
    a = stats.agents[0]
    assert (a.gold_correct, a.rationalized_tried, a.rationalized_kept, a.generator_examples) == (1, 3, 2, 3)
    assert stats.reads_gold and stats.selection == "star" and "GOLD" in stats.selection_rule
    assert json.loads((tmp_path / "stats.json").read_text())["reads_gold"] is True


def test_star_reads_gold_where_the_vote_rule_never_does(tmp_path):
    # Three agents agree on 4, gold is 5; agent 2 alone said 5.
    rec = make_record("p", "5", [["4"], ["4"], ["5"]])
    star = build_star_ftdata([rec], [], n_agents=3, cfg=FinetuneConfig(selection="star"), out_dir=tmp_path / "s", seed=0)
    vote = build_ftdata([rec], n_agents=3, cfg=FinetuneConfig(), out_dir=tmp_path / "v", seed=0)
    assert [a.generator_examples for a in star.agents] == [0, 0, 1]
    assert [a.generator_examples for a in vote.agents] == [1, 1, 0]
    assert not vote.reads_gold and "never read" in vote.selection_rule


def test_only_wrong_round0_answers_are_retried_with_a_hint_holding_gold():
    recs = [make_record("a", "7", [["7"], ["2"], [None]]), make_record("b", "1/2", [["0.5"]])]
    wanted = [(r.problem.id, r.agents[i].agent) for r, i in needs_rationalization(recs)]
    assert wanted == [("a", 1), ("a", 2)]  # 0.5 equals 1/2: no retry
    msgs = hinted_messages(Prompts("arithmetic"), recs[0].agents[1], "7")
    assert len(msgs) == 1 and msgs[0].content.startswith("problem a") and "\\boxed{ 7 }" in msgs[0].content


EXPR = [(3, 4, 5, 6, 7, 2), (12, 3, 9, 0, 5, 5), (29, 28, 27, 1, 2, 3), (7, 11, 13, 17, 19, 23), (1, 2, 3, 4, 5, 6),
        (9, 9, 9, 9, 9, 9), (0, 5, 5, 2, 1, 1), (8, 1, 2, 3, 4, 1)]
PROBLEMS = [Problem(id=f"q{i}", task="arithmetic", question=f"What is the result of {a}+{b}*{c}+{d}-{x}*{y}?",
                    gold=str(a + b * c + d - x * y)) for i, (a, b, c, d, x, y) in enumerate(EXPR)]


def test_the_simulator_finds_the_problem_behind_a_hint_and_follows_the_hint():
    known = Problem(id="k", task="gsm8k", question="Tom has 3 apples and buys 4 more. How many now?", gold="7")
    knowledge = Knowledge([known])
    plain = Prompts("gsm8k").question(known.question)
    for hint in ("7", "12"):  # the gold answer, and a wrong one: the model goes by the hint
        hinted = Prompts("gsm8k").render("star_hint", question=plain, answer=hint)
        assert knowledge.lookup(hinted).key == knowledge.lookup(plain).key == "gsm8k:k"
        answers = [respond("sim-base", base_params("sim-base", SimulatorConfig(skill=0)), [{"role": "user", "content": hinted}],
                           knowledge, SimulatorConfig(skill=0), seed=s) for s in range(40)]
        followed = sum(a.endswith(f"\\boxed{{{hint}}}") for a in answers)
        assert 10 <= followed <= 30  # skill 0: follows with probability (1 + 0) / 2


async def test_rationalization_stage_over_the_simulator_and_its_resume(tmp_path):
    out = tmp_path / "star-rationalize.jsonl"
    with SimServer(SimulatorConfig(skill=0.0, seed=1)) as sim:  # skill 0: every first answer is wrong
        async with LLMClient(base_url=sim.base_url, api_key="x", run_dir=tmp_path, endpoint=EndpointConfig(),
                             sampling=SamplingConfig(), seed=0) as client:
            society = Society(["sim-base"], ["sim-base"], "sim-base")
            task = get_task("arithmetic")
            debater = Debater(client, society, Prompts("arithmetic"), task.extract, DebateSettings(rounds=1),
                              iteration=0, split="train")
            records = await run_debates(debater, PROBLEMS, tmp_path / "debate-train.jsonl")
            assert not any(r.correct for r in records)
            made = await rationalize(client, Prompts("arithmetic"), task.extract, records, out, iteration=0)
            calls = len(read_jsonl(tmp_path / "usage.jsonl", UsageRecord))
            again = await rationalize(client, Prompts("arithmetic"), task.extract, records, out, iteration=0)
            assert len(read_jsonl(tmp_path / "usage.jsonl", UsageRecord)) == calls  # resumed: nothing re-asked
    assert len(made) == len(again) == len(PROBLEMS)
    by_id = {p.id: p for p in PROBLEMS}
    for r in made:
        request = r.messages[0].content
        assert by_id[r.problem_id].question in request and f"\\boxed{{ {by_id[r.problem_id].gold} }}" in request
        assert r.correct == (r.answer == by_id[r.problem_id].gold)
    assert 0 < sum(r.correct for r in made) < len(made)
    stats = build_star_ftdata(records, made, n_agents=1, cfg=FinetuneConfig(selection="star"), out_dir=tmp_path / "ft",
                              seed=0)
    assert stats.agents[0].generator_examples == sum(r.correct for r in made)


# ----------------------------------------------------------------------------- which models train

def agreeing_debates(n: int = 12):
    # Every agent agrees every time: 12 generator and 12 critic (C+) examples per agent.
    return [make_record(f"d{i}", "5", [["5", "5"]] * 3, split="train") for i in range(n)]


async def _finetune(tmp_path: Path, **finetune) -> tuple[list, list[dict], Path]:
    cfg = load_config("multiagent-ft", [f"finetune.{k}={json.dumps(v)}" for k, v in finetune.items()]
                      + ["finetune.poll_interval_s=0.1"])
    data_dir = tmp_path / "ftdata"
    stats = build_ftdata(agreeing_debates(), n_agents=3, cfg=cfg.finetune, out_dir=data_dir, seed=0)
    registry = Registry(run="t", base_model="sim-base")
    with SimServer(SimulatorConfig(job_seconds=0.1)) as sim:
        provider = OpenAIFinetuneProvider(sim.base_url, "x", poll_interval_s=0.1)
        stage = FinetuneStage(cfg, provider, registry, tmp_path / "registry.json", tmp_path, Console(quiet=True))
        await stage.run(stats, data_dir, target=1)
        await provider.close()
        async with AsyncOpenAI(base_url=sim.base_url, api_key="x") as client:
            jobs = [j async for j in client.fine_tuning.jobs.list()]
    return registry.entries, jobs, data_dir


async def test_multiagent_ft_trains_a_generator_and_a_critic_per_agent(tmp_path):
    entries, jobs, _ = await _finetune(tmp_path)
    assert len(jobs) == 6 and len({e.model_id for e in entries}) == 6


async def test_without_critic_only_the_generators_train_and_critics_stay_the_base_model(tmp_path):
    entries, jobs, _ = await _finetune(tmp_path, train_critics=False)
    assert len(jobs) == 3
    critics = [e for e in entries if e.role == "critic"]
    assert len(critics) == 3 and all(e.status == "kept" and e.model_id == "sim-base" for e in critics)
    assert all(e.status == "succeeded" and e.model_id.startswith("ft:") for e in entries if e.role == "generator")


async def test_single_agent_ft_trains_one_model_on_every_agents_pooled_data(tmp_path):
    entries, jobs, data_dir = await _finetune(tmp_path, single_model=True)
    assert len(jobs) == 1
    assert len(entries) == 6 and len({e.model_id for e in entries}) == 1  # every agent, both roles
    pooled = rows(data_dir / "one-model.jsonl")
    turns = sorted(sum(m["role"] == "assistant" for m in ex["messages"]) for ex in pooled)
    # 12 generator examples per agent, and 10 critic examples each (only C+ here: the mix keeps min_examples)
    assert len(pooled) == 66 and turns.count(1) == 36 and turns.count(2) == 30


def test_one_model_without_critics_pools_generator_examples_only(tmp_path):
    stats = build_ftdata(agreeing_debates(), n_agents=3, cfg=FinetuneConfig(), out_dir=tmp_path, seed=0)
    pooled = pool_one_model(stats, tmp_path, ("generator",))
    assert pooled.files[0].examples == 36 and len(rows(tmp_path / "one-model.jsonl")) == 36


# ----------------------------------------------------------------------------- presets and config

def test_every_method_of_tables_1_and_2_is_a_preset_defining_it():
    star = load_config("star")
    assert (star.finetune.selection, star.finetune.single_model, star.debate.agents, star.debate.rounds) == ("star", True, 1, 1)
    mft = load_config("majority-ft")  # what the old `star` preset really was
    assert (mft.finetune.selection, mft.finetune.single_model, mft.debate.agents, mft.debate.rounds) == ("vote", True, 3, 1)
    assert load_config("multiagent-ft-wo-summary").debate.mode == "concatenate"
    assert load_config("multiagent-ft-wo-critic").finetune.train_critics is False
    saft = load_config("single-agent-ft")
    assert saft.finetune.single_model and (saft.test_agents, saft.test_rounds) == (3, 2)
    wo = load_config("single-agent-ft-wo-debate")
    assert wo.finetune.single_model and (wo.debate.agents, wo.debate.rounds) == (3, 2)
    assert (wo.test_agents, wo.test_rounds) == (1, 1)
    for name in ("single-agent", "majority-vote", "debate", "star", "majority-ft", "multiagent-ft"):
        cfg = load_config(name)
        assert (cfg.task.n_train, cfg.task.n_test) == (500, 500)  # the paper's sizes


def test_method_config_mistakes_are_named():
    with pytest.raises(ConfigError, match="finetune.selection.*debate.rounds=1"):
        load_config("star", ["debate.rounds=2"])
    with pytest.raises(ConfigError, match="evaluation.agents"):
        load_config("multiagent-ft", ["evaluation.agents=5"])
    with pytest.raises(ConfigError, match="finetune.selection"):
        load_config("multiagent-ft", ["finetune.selection=gold"])
