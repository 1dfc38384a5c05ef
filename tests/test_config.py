import pytest
import yaml

from harness.config import config_to_yaml, load_config, preset_names
from harness.errors import ConfigError


def test_demo_is_the_default_and_follows_the_paper():
    cfg = load_config()
    assert cfg.name == "demo" and cfg.endpoint.kind == "simulator"
    assert (cfg.debate.agents, cfg.debate.rounds, cfg.debate.mode) == (3, 2, "summarize")
    hp = cfg.finetune.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (2, 1, 1.0)
    assert cfg.task.levels == [1, 2, 3]


def test_overrides_are_typed_and_nested():
    cfg = load_config("demo", ["debate.agents=5", "sampling.temperature=0.7", "task.name=gsm8k"])
    assert cfg.debate.agents == 5 and cfg.sampling.temperature == 0.7 and cfg.task.name == "gsm8k"


@pytest.mark.parametrize("override, field, hint", [
    ("debate.rounds=0", "debate.rounds", "greater than or equal to 1"),
    ("debate.agnts=3", "debate.agnts", "allowed here: agents, mode, rounds"),
    ("task.name=chess", "task.name", "'arithmetic', 'gsm8k', 'math' or 'mmlu'"),
    ("debate.mode=vote", "debate.mode", "summarize"),
])
def test_bad_values_name_the_field_and_what_is_allowed(override, field, hint):
    with pytest.raises(ConfigError) as e:
        load_config("demo", [override])
    assert f"field '{field}'" in str(e.value) and hint in str(e.value)


def test_bad_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("debate: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    bad.write_text("debate:\n  agents: many\n")
    with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*field 'debate.agents'.*'many'"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="presets: .*demo"):
        load_config("no-such-preset")


def test_saved_config_holds_no_secret(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "fake-secret-value-123456789")
    cfg = load_config("demo", ["endpoint.kind=openai", "models.base=gpt-4.1-mini"])
    assert cfg.endpoint.api_key() == "fake-secret-value-123456789"
    text = config_to_yaml(cfg)
    assert "fake-secret" not in text and "OPENAI_API_KEY" in text
    assert yaml.safe_load(text)["endpoint"]["kind"] == "openai"


def test_missing_key_says_which_variable(monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    cfg = load_config("demo", ["endpoint.kind=openai", "models.base=gpt-4.1-mini", "endpoint.api_key_env=MY_KEY"])
    with pytest.raises(ConfigError, match="MY_KEY is not set"):
        cfg.endpoint.api_key()


def test_every_shipped_preset_loads():
    names = preset_names()
    assert "demo" in names
    for name in names:
        load_config(name)


def test_dict_fields_take_the_rest_of_the_path_as_one_key():
    cfg = load_config("demo", [
        "prices.gpt-4.1-mini={input: 0.4, output: 1.6}",
        "sampling.extra_body.min_p=0.05",
        "sampling.extra_body.top_k=20",
        "serve.env.VLLM_X=1",
    ])
    assert cfg.prices == {"gpt-4.1-mini": {"input": 0.4, "output": 1.6}}
    assert cfg.sampling.extra_body == {"min_p": 0.05, "top_k": 20}
    assert cfg.serve.env == {"VLLM_X": "1"}  # a text-valued dict keeps the text


def test_exponent_numbers_are_floats_at_any_depth():
    cfg = load_config("demo", [
        "finetune.local.learning_rate=5E-5",
        "budget.max_cost_usd=5E3",
        "sampling.extra_body={min_p: 1e-4, stop: [1e2, x]}",
        "sampling.extra_body.eps=1e-8",
        "task.source=/data/1e5/x.jsonl",
        "name=1e5",
    ])
    assert cfg.finetune.local.learning_rate == 5e-5 and cfg.budget.max_cost_usd == 5000.0
    assert cfg.sampling.extra_body == {"min_p": 1e-4, "stop": [100.0, "x"], "eps": 1e-8}
    assert isinstance(cfg.sampling.extra_body["min_p"], float)
    assert cfg.task.source == "/data/1e5/x.jsonl" and cfg.name == "1e5"
    # quoting still makes a string
    assert load_config("demo", ["sampling.extra_body.tag='1e-4'"]).sampling.extra_body == {"tag": "1e-4"}


def test_a_full_finetune_loads_with_a_vllm_endpoint():
    """The authors fully finetuned their open models; each agent is then served as a whole model."""
    assert load_config("vllm", ["finetune.local.full_finetune=true"]).finetune.local.full_finetune


def test_real_model_presets_follow_the_paper():
    """The paper's reply length (2048 tokens, the config default) on the real endpoints, and
    its Phi-3: the 128k-context model."""
    from harness.config import SamplingConfig

    for name in ("vllm", "openai"):
        assert load_config(name).sampling.max_tokens == SamplingConfig().max_tokens == 2048
    cfg = load_config("vllm")
    assert cfg.serve.model == "microsoft/Phi-3-mini-128k-instruct"
    assert cfg.serve.max_model_len > cfg.sampling.max_tokens * 2


def test_min_voters_defaults_to_the_authors_rule_and_rejects_zero():
    assert load_config("demo").finetune.min_voters == 1
    assert load_config("demo", ["finetune.min_voters=2"]).finetune.min_voters == 2
    with pytest.raises(ConfigError, match="min_voters"):
        load_config("demo", ["finetune.min_voters=0"])
