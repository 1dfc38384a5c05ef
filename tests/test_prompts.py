import pytest

from harness.errors import ConfigError
from harness.prompts import Prompts


def test_task_templates_ask_for_a_boxed_answer_and_hold_the_question():
    for task in ("arithmetic", "gsm8k", "math", "mmlu"):
        text = Prompts(task).question("What is 1+2*3+4-5*6?")
        assert "What is 1+2*3+4-5*6?" in text
        assert "\\boxed{" in text


def test_debate_message_numbers_the_other_agents_and_keeps_latex_braces():
    p = Prompts("arithmetic")
    msg = p.debate([(1, "so \\boxed{7}"), (2, "hence \\boxed{\\frac{1}{2}}")])
    assert "Agent 2 wrote:\nso \\boxed{7}" in msg
    assert "Agent 3 wrote:\nhence \\boxed{\\frac{1}{2}}" in msg
    assert "{other_answers}" not in msg


def test_user_templates_override_the_shipped_ones(tmp_path):
    (tmp_path / "question.txt").write_text("Q: {question}\nAnswer in \\boxed{}.")
    p = Prompts("gsm8k", tmp_path)
    assert p.question("how many?") == "Q: how many?\nAnswer in \\boxed{}."
    assert "other agents" in p.debate([(0, "x")])  # roles the user did not override fall back


def test_a_template_missing_its_placeholder_is_a_clear_error(tmp_path):
    (tmp_path / "debate.txt").write_text("Look at the others and try again.")
    with pytest.raises(ConfigError, match=r"debate.txt.*\{other_answers\}"):
        Prompts("arithmetic", tmp_path)


def test_missing_prompts_dir_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="task.prompts_dir"):
        Prompts("math", tmp_path / "nope")
