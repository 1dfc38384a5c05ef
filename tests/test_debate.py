"""The debate engine against the simulator over real HTTP."""


import pytest

from harness.config import EndpointConfig, SamplingConfig, SimulatorConfig
from harness.debate import Debater, DebateSettings, Society, finished_records, problems_in_flight, run_debates
from harness.errors import DataError, LLMError
from harness.fileio import read_jsonl
from harness.llm import LLMClient
from harness.prompts import Prompts
from harness.records import Problem, UsageRecord
from harness.sim import SimServer
from harness.tasks import get_task

PROBLEMS = [Problem(id=f"p{i}", task="arithmetic", question=f"What is the result of {i}+2*3+4-5*{i % 4}?",
                    gold=str(i + 6 + 4 - 5 * (i % 4))) for i in range(12)]


async def _debate(tmp_path, sim_cfg, mode="concatenate", agents=3, rounds=2, problems=PROBLEMS,
                  sampling=None, max_in_flight=32, prompt_set="harness"):
    with SimServer(sim_cfg) as sim:
        async with LLMClient(base_url=sim.base_url, api_key="x", run_dir=tmp_path, endpoint=EndpointConfig(),
                             sampling=sampling or SamplingConfig(), seed=0) as client:
            society = Society(generators=["sim-base"] * agents, critics=["sim-base"] * agents, summarizer="sim-base")
            debater = Debater(client, society, Prompts("arithmetic", prompt_set=prompt_set),
                              get_task("arithmetic").extract, DebateSettings(rounds=rounds, mode=mode),
                              iteration=0, split="test")
            return await run_debates(debater, problems, tmp_path / "debate-test.jsonl", max_in_flight=max_in_flight)


async def test_each_agent_keeps_its_own_conversation_and_sees_only_the_others(tmp_path):
    records = await _debate(tmp_path, SimulatorConfig(skill=0.5, persuadability=0.5, seed=3))
    assert [r.problem.id for r in records] == [p.id for p in PROBLEMS]
    for r in records:
        assert len(r.agents) == 3 and len(r.round_votes) == 2
        for t in r.agents:
            roles = [m.role for m in t.messages]
            assert roles == ["user", "assistant", "user", "assistant"]
            assert r.problem.question in t.messages[0].content
            own_first = t.messages[1].content
            others_first = [o.messages[1].content for o in r.agents if o.agent != t.agent]
            # round 1 shows the other agents' round-0 answers, never the agent's own
            for text in others_first:
                assert text.strip() in t.messages[2].content
            if own_first not in others_first:
                assert own_first.strip() not in t.messages[2].content
            assert len(t.answers) == 2 and len(t.correct) == 2
        assert r.vote.tie_rule
    # samples differ across agents although they get the same round-0 prompt
    firsts = {t.messages[1].content for r in records for t in r.agents}
    assert len(firsts) > len(records)


async def test_vote_and_correctness_follow_the_answers(tmp_path):
    records = await _debate(tmp_path, SimulatorConfig(skill=1.0, seed=1))
    assert all(r.correct for r in records)
    assert all(r.vote.count == 3 and not r.vote.tie for r in records)
    records = await _debate(tmp_path / "wrong", SimulatorConfig(skill=0.0, persuadability=0.0, seed=1))
    assert not any(r.correct for r in records)


async def test_summarize_mode_sends_one_summary_per_agent_and_round(tmp_path):
    records = await _debate(tmp_path, SimulatorConfig(skill=0.6, seed=2), mode="summarize", rounds=3,
                            problems=PROBLEMS[:4])
    usage = read_jsonl(tmp_path / "usage.jsonl", UsageRecord)
    summaries = [u for u in usage if u.purpose == "summary"]
    assert len(summaries) == 4 * 3 * 2  # problems x agents x later rounds
    for r in records:
        for t in r.agents:
            assert len(t.messages) == 6
            assert "digest" in t.messages[2].content


async def test_unparseable_answers_do_not_vote_and_count_as_wrong(tmp_path):
    records = await _debate(tmp_path, SimulatorConfig(skill=1.0, malformed_rate=1.0, seed=1), problems=PROBLEMS[:3])
    for r in records:
        assert r.vote.answer is None and r.vote.n_voters == 0 and not r.correct
        assert all(a is None for t in r.agents for a in t.answers)


async def test_a_restarted_debate_skips_finished_problems(tmp_path):
    await _debate(tmp_path, SimulatorConfig(seed=4), problems=PROBLEMS[:5])
    calls_before = len(read_jsonl(tmp_path / "usage.jsonl"))
    records = await _debate(tmp_path, SimulatorConfig(seed=4), problems=PROBLEMS[:8])
    assert len(records) == 8
    assert set(finished_records(tmp_path / "debate-test.jsonl")) == {p.id for p in PROBLEMS[:8]}
    new_usage = read_jsonl(tmp_path / "usage.jsonl", UsageRecord)[calls_before:]
    assert {u.sample.problem_id for u in new_usage} == {p.id for p in PROBLEMS[5:8]}


async def test_a_reply_cut_off_by_max_tokens_does_not_vote(tmp_path):
    """Arithmetic allows a plain final number, but a cut-off reply's last number is an
    intermediate step: it must count as unparseable, and the record says it was cut off."""
    records = await _debate(tmp_path, SimulatorConfig(skill=1.0, seed=1), problems=PROBLEMS[:3],
                            sampling=SamplingConfig(max_tokens=6))
    for r in records:
        assert all(t.truncated == [True, True] for t in r.agents)
        assert r.vote.answer is None and not r.correct


async def test_records_are_saved_from_the_start_not_all_at_the_end(tmp_path):
    """With a bounded number of problems in flight, the first records land long before the last
    calls are made, so a crash or a budget stop mid-split keeps most of the finished work."""
    path = tmp_path / "debate-test.jsonl"
    records_seen_when = []

    with SimServer(SimulatorConfig(latency_ms=5, seed=2)) as sim:
        endpoint = EndpointConfig(concurrency=4)
        async with LLMClient(base_url=sim.base_url, api_key="x", run_dir=tmp_path, endpoint=endpoint,
                             sampling=SamplingConfig(), seed=0) as client:
            society = Society(["sim-base"] * 3, ["sim-base"] * 3, "sim-base")
            debater = Debater(client, society, Prompts("arithmetic"), get_task("arithmetic").extract,
                              DebateSettings(rounds=2, mode="concatenate"), iteration=0, split="test")

            def on_done(_record):
                records_seen_when.append(len(read_jsonl(tmp_path / "usage.jsonl")))

            await run_debates(debater, PROBLEMS, path, on_done, max_in_flight=problems_in_flight(4, 3))
    total_calls = len(PROBLEMS) * 3 * 2
    assert records_seen_when[0] < total_calls / 2


async def test_resuming_with_a_different_society_is_refused_naming_the_file(tmp_path):
    await _debate(tmp_path, SimulatorConfig(seed=4), problems=PROBLEMS[:2])
    with pytest.raises(DataError, match=r"debate-test.jsonl.*3 agents.*this run has 2 agents"):
        await _debate(tmp_path, SimulatorConfig(seed=4), problems=PROBLEMS[:3], agents=2)


@pytest.mark.parametrize("mode", ["concatenate", "summarize"])
async def test_a_turn_refused_for_context_length_is_unparsed_and_the_debate_goes_on(tmp_path, mode):
    """A conversation that outgrows the model's context window (a 400 from OpenAI or from vLLM's
    max_model_len) must not stop the split: that turn is an unparseable reply, with the reason."""
    records = await _debate(tmp_path, SimulatorConfig(skill=1.0, seed=1, context_tokens=200), mode=mode,
                            problems=PROBLEMS[:3])
    assert len(records) == 3
    for r in records:
        for t in r.agents:
            assert t.errors[0] is None and t.answers[0] is not None
            assert "maximum context length is 200" in t.errors[1] and t.answers[1] is None
        assert r.vote.answer is None and not r.correct


async def test_other_bad_requests_still_stop_the_run(tmp_path):
    """A 400 that is not about one conversation's length (a bad parameter, say) is a configuration
    error that every call would hit: it must stop the run, not be absorbed as empty replies."""
    from test_llm_server import ScriptedServer

    with ScriptedServer() as server:
        server.fail(400, {"message": "Unsupported parameter: 'seed'", "code": "unsupported_parameter"}, times=100)
        async with LLMClient(base_url=server.base_url, api_key="x", run_dir=tmp_path, endpoint=EndpointConfig(),
                             sampling=SamplingConfig(), seed=0) as client:
            society = Society(["m"] * 3, ["m"] * 3, "m")
            debater = Debater(client, society, Prompts("arithmetic"), get_task("arithmetic").extract,
                              DebateSettings(rounds=2, mode="concatenate"), iteration=0, split="test")
            with pytest.raises(LLMError, match="Unsupported parameter"):
                await run_debates(debater, PROBLEMS[:2], tmp_path / "debate-test.jsonl")


def test_the_authors_set_shows_at_most_five_others_shuffled_reproducibly():
    society = Society(generators=["m"] * 8, critics=["m"] * 8, summarizer="m")

    def shown(agent, rnd, seed=0, problem=PROBLEMS[0]):
        debater = Debater(None, society, Prompts("math", prompt_set="authors"), str, DebateSettings(seed=seed),
                          iteration=0, split="test")
        return [j for j, _ in debater.others_shown(problem, agent, rnd, [f"answer {j}" for j in range(8)])]

    orders = {tuple(shown(a, r)) for a in range(8) for r in (1, 2)}
    for order in orders:
        assert len(order) == 5 and len(set(order)) == 5
    assert all(a not in shown(a, 1) for a in range(8))
    assert shown(3, 1) == shown(3, 1)  # a resumed run rebuilds the same message
    assert len(orders) > 8  # shuffled per agent and round, not one fixed order
    assert shown(3, 1, seed=1) != shown(3, 1) or shown(3, 1, problem=PROBLEMS[1]) != shown(3, 1)
    # The harness set shows every other agent, in order.
    harness = Debater(None, society, Prompts("math"), str, DebateSettings(), iteration=0, split="test")
    assert [j for j, _ in harness.others_shown(PROBLEMS[0], 3, 1, ["x"] * 8)] == [0, 1, 2, 4, 5, 6, 7]


@pytest.mark.parametrize("mode", ["concatenate", "summarize"])
async def test_a_debate_with_the_authors_prompts(tmp_path, mode):
    records = await _debate(tmp_path, SimulatorConfig(skill=0.6, seed=2), mode=mode, problems=PROBLEMS[:4],
                            prompt_set="authors")
    for r in records:
        for t in r.agents:
            assert t.messages[0].content == f"{r.problem.question} Make sure to state your answer at the end of the response."
            later = t.messages[2].content
            assert "Agent " not in later and "wrote:" not in later
            if mode == "concatenate":
                assert later.startswith("These are the recent/updated opinions from other agents: \n\n One agent response: ```")
                assert later.count("One agent response") == 2
            else:
                assert later.startswith("Here is a summary of solutions from several other agents: ")
                assert f"can solve {r.problem.question} and give your updated answer?" in later
    assert all(len(t.answers) == 2 for r in records for t in r.agents)


@pytest.mark.parametrize("task", ["gsm8k", "arithmetic"])
def test_the_authors_set_keeps_agent_order_for_gsm8k_and_arithmetic(task):
    """The authors' GSM8K and arithmetic code shows every other agent in agent order (no shuffle,
    no cap of 5): so does their prompt set there, for any seed, problem, agent and round."""
    society = Society(generators=["m"] * 8, critics=["m"] * 8, summarizer="m")
    for seed in (0, 1):
        debater = Debater(None, society, Prompts(task, prompt_set="authors"), str, DebateSettings(seed=seed),
                          iteration=0, split="test")
        for problem in PROBLEMS[:2]:
            for agent in (0, 3, 7):
                for rnd in (1, 2):
                    shown = debater.others_shown(problem, agent, rnd, [f"answer {j}" for j in range(8)])
                    assert [j for j, _ in shown] == [j for j in range(8) if j != agent]
