import pytest

from harness.errors import ConfigError
from harness.prompts import Prompts
from harness.tasks.arithmetic import to_problem


def test_task_templates_ask_for_a_boxed_answer_and_hold_the_question():
    for task in ("arithmetic", "gsm8k", "math", "mmlu"):
        text = Prompts(task).question("What is 1+2*3+4-5*6?")
        assert "What is 1+2*3+4-5*6?" in text
        assert "\\boxed{" in text


def test_debate_message_numbers_the_other_agents_and_keeps_latex_braces():
    p = Prompts("arithmetic")
    msg = p.debate([(1, "so \\boxed{7}"), (2, "hence \\boxed{\\frac{1}{2}}")], question="Q")
    assert "Agent 2 wrote:\nso \\boxed{7}" in msg
    assert "Agent 3 wrote:\nhence \\boxed{\\frac{1}{2}}" in msg
    assert "{other_answers}" not in msg


def test_user_templates_override_the_shipped_ones(tmp_path):
    (tmp_path / "question.txt").write_text("Q: {question}\nAnswer in \\boxed{}.")
    p = Prompts("gsm8k", tmp_path)
    assert p.question("how many?") == "Q: how many?\nAnswer in \\boxed{}."
    assert "other agents" in p.debate([(0, "x")], question="q")  # roles the user did not override fall back


def test_a_template_missing_its_placeholder_is_a_clear_error(tmp_path):
    (tmp_path / "debate.txt").write_text("Look at the others and try again.")
    with pytest.raises(ConfigError, match=r"debate.txt.*\{other_answers\}"):
        Prompts("arithmetic", tmp_path)


def test_an_unknown_placeholder_is_an_error_naming_the_file_not_text_for_the_model(tmp_path):
    (tmp_path / "other_answer.txt").write_text("Agent {agnet} said: {answer}")
    with pytest.raises(ConfigError) as err:
        Prompts("math", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "other_answer.txt") in msg and "{agnet}" in msg and "{agent}" in msg
    # A placeholder of another role is unknown here too.
    (tmp_path / "other_answer.txt").write_text("{answer} for {question}")
    with pytest.raises(ConfigError, match=r"other_answer.txt: unknown placeholder\(s\) \{question\}"):
        Prompts("math", tmp_path)


def test_any_subset_of_a_roles_placeholders_and_doubled_braces_for_literal_words(tmp_path):
    (tmp_path / "summarize.txt").write_text("Summarize:{other_answers}")  # no {question}
    (tmp_path / "other_answer.txt").write_text("- {answer}")  # no {agent}: anonymous
    (tmp_path / "debate.txt").write_text("Others:\n{other_answers}\nSolve {question} again, in \\boxed{{answer}}.\n")
    p = Prompts("math", tmp_path)
    assert p.summarize("ignored", [(0, "a"), (2, "b")]) == "Summarize:- a\n\n- b"
    # {question} renders inside the debate message; a {question} written by a model stays as written.
    assert p.debate([(1, "I read {question} as x")], question="What is $x$?") == \
        "Others:\n- I read {question} as x\nSolve What is $x$? again, in \\boxed{answer}."


def test_missing_prompts_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="task.prompts_dir"):
        Prompts("math", tmp_path / "nope")


# ----------------------------------------------------------------------------- the authors' prompts
# The expected strings are the authors' (see harness/resources/prompts/authors/README.md), written out in full.

Q = "What is $1+2$?"
ANSWERS = [(0, "First \\boxed{3}."), (2, " So \\boxed{4}\n")]


def test_authors_math_prompts_word_for_word():
    p = Prompts("math", prompt_set="authors")
    assert p.question(Q) == (
        "Can you solve the following math problem? What is $1+2$? Provide a bullet point summary of your "
        "reasoning. Your final answer should be a single answer, in the form \\boxed{answer}, at the end of "
        "your response.")
    assert p.debate(ANSWERS, question=Q) == (
        "Here is are solution from other agents: \n\n One agent response: First \\boxed{3}.\n\n One agent "
        "response:  So \\boxed{4}\n\n\n Using each response as additional advice, can you give an updated "
        "bullet by bullet answer to What is $1+2$?? Your final answer should be be in the form \\boxed{answer} "
        "given at the end of your response.")
    assert p.summarize(Q, ANSWERS) == (
        "Here are a list of opinions from different agents: \n\n One agent response: ```First \\boxed{3}.```"
        "\n\n One agent response: ``` So \\boxed{4}\n```\n\n Write a summary of the different opinions from "
        "each of the individual agent and explain the reasoning in each solution.")
    assert p.debate_summary("Both say 3.", question=Q) == (
        "Here is a summary of solutions from several other agents: Both say 3.\n\n Examine each these "
        "solutions as additional advice, can solve What is $1+2$? and give your updated answer? Explain your "
        "reasoning. \n Your final answer should be be in the form \\boxed{answer} given at the end of your "
        "response.")


def test_authors_gsm8k_prompts_word_for_word():
    p = Prompts("gsm8k", prompt_set="authors")
    assert p.question("How many apples?") == (
        "Can you solve the following math problem? How many apples? Explain your reasoning. Your final answer "
        "should be a single numerical number, in the form \\boxed{answer}, at the end of your response. ")
    assert p.debate(ANSWERS, question="How many apples?") == (
        "These are the solutions to the problem from other agents: \n\n One agent solution: ```First "
        "\\boxed{3}.```\n\n One agent solution: ``` So \\boxed{4}\n```\n\n Using the solutions from other "
        "agents as additional information, can you provide your answer to the math problem? \n The original "
        "math problem is How many apples?. Your final answer should be a single numerical number, in the form "
        "\\boxed{answer}, at the end of your response.")
    assert p.debate_summary("S", question="How many apples?").startswith(
        "Here is a summary of solutions from several other agents: S\n\n Examine each these solutions")


def test_authors_arithmetic_prompts_word_for_word():
    p = Prompts("arithmetic", prompt_set="authors")
    problem = to_problem(((3, 4, 5, 6, 7, 8), "+*+-*"))
    assert p.question(problem.question) == \
        "What is the result of 3+4*5+6-7*8? Make sure to state your answer at the end of the response."
    assert p.debate(ANSWERS, question=problem.question) == (
        "These are the recent/updated opinions from other agents: \n\n One agent response: ```First "
        "\\boxed{3}.```\n\n One agent response: ``` So \\boxed{4}\n```\n\n Use these opinions carefully as "
        "additional advice, can you provide an updated answer? Make sure to state your answer at the end of "
        "the response.")


def test_the_authors_set_covers_their_tasks_only():
    with pytest.raises(ConfigError, match="task.prompt_set.*arithmetic, gsm8k, math.*mmlu"):
        Prompts("mmlu", prompt_set="authors")
    with pytest.raises(ConfigError, match="unknown prompt set 'theirs'"):
        Prompts("math", prompt_set="theirs")
