"""The GPU estimate (harness.scaling): its formulas on cases known from the literature, the
table of `python -m harness.scaling`, and the "GPU estimate" section of `--dry-run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import load_config
from harness.identity import frozen_settings
from harness.scaling import (GB, KNOWN_MODELS, PLACEHOLDER_MEMORY_RATIO, PLACEHOLDER_WALL_RATIO, Hardware,
                             Workload, estimate, full_ft_state_bytes, model_shape, resident_ratios, train_flops,
                             workload)

REPO = Path(__file__).resolve().parent.parent
MISTRAL = KNOWN_MODELS["mistral-7b"]


def test_parameter_counts_match_the_published_models():
    # The counts their model cards give (config.json's shapes through the formula).
    assert MISTRAL.params == 7_241_732_096
    assert KNOWN_MODELS["llama-3-8b"].params == 8_030_261_248
    assert KNOWN_MODELS["phi-3-mini"].params == 3_821_079_552
    assert KNOWN_MODELS["smollm2-135m"].params == 134_515_008
    assert MISTRAL.lora_params(8) == 20_971_520  # PEFT's count for r=8 on every linear layer
    assert model_shape("mistralai/Mistral-7B-Instruct-v0.2") == MISTRAL
    assert model_shape("meta-llama/Meta-Llama-3-8B-Instruct").name == "Llama-3-8B"
    assert model_shape("someone/unknown-model") is None


@pytest.mark.slow
def test_the_counts_are_those_of_the_transformers_and_peft_models():
    """The shape formula against the real architectures (built on the meta device: no weights)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    for key, config_class in (("mistral-7b", transformers.MistralConfig), ("smollm2-135m", transformers.LlamaConfig)):
        s = KNOWN_MODELS[key]
        config = config_class(hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
                              vocab_size=s.vocab, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                              tie_word_embeddings=s.tied)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        assert sum(p.numel() for p in model.parameters()) == s.params, key
        lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == s.lora_params(8), key


def test_a_local_config_json_gives_the_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=576, num_hidden_layers=30, intermediate_size=1536, vocab_size=49152, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True)))
    shape = model_shape(str(tmp_path))
    assert shape is not None and shape.params == KNOWN_MODELS["smollm2-135m"].params


def test_7b_full_finetuning_needs_112_gb_of_states_and_fits_80_gb_gpus_only_sharded():
    assert full_ft_state_bytes(7e9) == 112e9  # 16 bytes/param: mixed-precision AdamW
    assert full_ft_state_bytes(7e9) > 80 * GB and full_ft_state_bytes(7e9, shards=8) == 14e9
    wl = Workload(agents=3, decode_tokens=2_400_000, job_tokens=[315_000] * 3 + [917_000] * 3, micro_batch=4,
                  max_length=2048, lora_r=8, summarizer_model=True)
    hw = Hardware(gpus=8, gpu_memory_gb=80)
    ratios = resident_ratios(Path("/nonexistent/result.json"))
    one = {r.key: r for r in estimate(MISTRAL, hw, wl, ratios, full_shards=1)}
    assert not one["full"].fits and one["full"].train_memory_gb > 80
    eight = {r.key: r for r in estimate(MISTRAL, hw, wl, ratios, full_shards=8)}
    assert eight["full"].fits and eight["full"].train_memory_gb < 40 and eight["full"].jobs_at_once == 1
    chosen = {r.key: r for r in estimate(MISTRAL, hw, wl, ratios)}  # the fewest GPUs per job that fit
    assert chosen["full"].fits and chosen["full"].gpus_per_job == 2 and chosen["full"].jobs_at_once == 4
    # LoRA: the bf16 base (14.5 GB) + activations, on one GPU per job, 6 jobs at once.
    assert 14.5 < chosen["per_job"].train_memory_gb < 30 and chosen["per_job"].jobs_at_once == 6
    # 2N whole models + the base summarizer: 7 servers on 8 GPUs; LoRA: the base loaded once per run.
    assert chosen["full"].servers.startswith("7 whole") and chosen["full"].load_hours > 0
    assert chosen["per_job"].load_hours == 0


def test_training_flops_full_is_6_per_param_and_lora_about_two_thirds():
    assert train_flops(1000, 7e9) == 6 * 7e9 * 1000
    lora = train_flops(1000, 7e9, MISTRAL.lora_params(8))
    assert 0.66 < lora / train_flops(1000, 7e9) < 0.67
    assert train_flops(1000, 7e9, recompute=True) == 8 * 7e9 * 1000  # activation checkpointing: forward twice


def test_without_the_benchmark_result_the_resident_row_uses_the_documented_placeholder(tmp_path):
    missing = resident_ratios(tmp_path / "result.json")
    assert not missing.measured and "PLACEHOLDER" in missing.source
    assert (missing.wall_ratio, missing.memory_ratio) == (PLACEHOLDER_WALL_RATIO, PLACEHOLDER_MEMORY_RATIO)
    (tmp_path / "result.json").write_text(json.dumps({"wall": 0.95}))
    unreadable = resident_ratios(tmp_path / "result.json")
    assert not unreadable.measured and "no numeric wall_ratio" in unreadable.source
    (tmp_path / "result.json").write_text(json.dumps({"wall_ratio": 0.95, "memory_ratio_vs_one_job": 1.2}))
    measured = resident_ratios(tmp_path / "result.json")
    assert measured.measured and (measured.wall_ratio, measured.memory_ratio) == (0.95, 1.2)
    wl = workload(load_config("vllm"))
    hw = Hardware(gpus=1, gpu_memory_gb=80)
    rows = [{r.key: r for r in estimate(MISTRAL, hw, wl, x)} for x in (missing, measured)]
    # On one GPU, (b) takes the measured share of (a)'s jobs in a row, and never less than one
    # load plus the jobs' compute (on a GPU the loads it saves are a small share: 0.5 hits that floor).
    per_job = rows[0]["per_job"]
    assert rows[1]["resident"].train_hours == pytest.approx(0.95 * per_job.train_hours)
    assert per_job.train_hours * 0.5 < rows[0]["resident"].train_hours < rows[1]["resident"].train_hours
    assert rows[1]["resident"].train_memory_gb == pytest.approx(1.2 * per_job.train_memory_gb)


def test_the_gpus_planned_for_are_not_part_of_a_run_s_identity():
    cfg = load_config("vllm", ["hardware.gpus=8"])
    assert not any(k.startswith("hardware.") for k in frozen_settings(cfg)), "--resume may change them"


def test_the_cli_prints_the_three_ways(cli):
    done = cli("--model", "mistral-7b", "--gpus", "8", "--gpu-memory-gb", "80", module="harness.scaling",
               env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "Mistral-7B (7.24B params), 8 x 80 GB H100" in out
    for way in ("(a) LoRA, a process per adapter", "(b) LoRA resident", "(c) full FT, FSDP over 2"):
        assert way in out
    assert "arxiv.org/abs/1910.02054" in out and "training FLOPs utilization" in out  # every assumption with its source
    bad = cli("--model", "no-such-model", module="harness.scaling")
    assert bad.returncode == 2 and "--model no-such-model" in bad.stdout and "Traceback" not in bad.stderr


@pytest.fixture
def math_files(tmp_path):
    """The bundled MATH sample, cycled to 500 problems per split (no download)."""
    rows = [json.loads(line) for line in
            (REPO / "harness" / "resources" / "data" / "math-sample.jsonl").read_text().splitlines()]
    for split in ("train", "test"):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(500):
                f.write(json.dumps(dict(rows[i % len(rows)], problem=f"{rows[i % len(rows)]['problem']} ({split} {i})",
                                        level="Level 1")) + "\n")
    return ["--set", f"task.source={tmp_path / 'train.jsonl'}", "--set", f"task.test_source={tmp_path / 'test.jsonl'}"]


def test_dry_run_of_a_vllm_run_with_local_finetuning_shows_the_gpu_estimate(cli, math_files):
    done = cli("--config", "vllm", "--dry-run", *math_files, "--set", "hardware.gpus=8", env={"COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "GPU estimate: Phi-3-mini (3.82B params), 8 x 80 GB H100" in out
    assert "* (a) LoRA, a process per adapter" in out  # the preset's way, marked
    assert "warning" not in out and "nothing was called" in out

    # One GPU too small for the LoRA jobs beside the server's half: a clear warning naming what fits.
    # With one GPU, finetune.local.trainer's `auto` is the resident trainer: that is the way named.
    small = cli("--config", "vllm", "--dry-run", *math_files, "--set", "hardware.gpu_memory_gb=16",
                env={"COLUMNS": "200"})
    assert small.returncode == 0, small.stdout + small.stderr
    assert "warning: (b) LoRA resident, one process does not fit 1 x 16 GB GPUs" in small.stdout
    assert "what fits:" not in small.stdout and "no way fits" in small.stdout
    assert "held by the vLLM server" in small.stdout


def test_dry_run_of_other_providers_has_no_gpu_estimate(cli):
    done = cli("--dry-run", "--set", "finetune.iterations=1")  # the demo: the simulator
    assert done.returncode == 0, done.stdout + done.stderr
    assert "GPU estimate" not in done.stdout


def test_a_full_finetune_on_too_few_gpus_per_job_is_warned_with_the_fewest_that_fit():
    import io

    from rich.console import Console

    from harness.scaling_report import print_report

    out = io.StringIO()
    wl = workload(load_config("vllm"))
    print_report(Console(file=out, width=200), MISTRAL, Hardware(gpus=8, gpu_memory_gb=80), wl, mark="full",
                 ratios=resident_ratios(Path("/nonexistent/result.json")), full_shards=1)
    text = out.getvalue()
    assert "warning: (c) full FT, FSDP over 1 does not fit 8 x 80 GB GPUs" in text
    assert "what fits: finetune.local.processes_per_job=2" in text


def test_the_configured_way_follows_the_trainer_field_as_the_provider_does():
    from harness.config import load_config
    from harness.scaling import configured_mode

    def cfg(*sets: str):
        return load_config("vllm", list(sets))
    assert configured_mode(cfg("finetune.local.trainer=per_job"), gpus=1) == "per_job"
    assert configured_mode(cfg("finetune.local.trainer=resident"), gpus=8) == "resident"
    assert configured_mode(cfg("finetune.local.trainer=auto"), gpus=1) == "resident"
    assert configured_mode(cfg("finetune.local.trainer=auto"), gpus=8) == "per_job"
    assert configured_mode(cfg("finetune.local.runner=ray"), gpus=1) == "per_job"  # Ray jobs: one per adapter
    assert configured_mode(cfg("finetune.local.full_finetune=true"), gpus=8) == "full"
    assert cfg().finetune.local.resident  # one device (none listed): what the provider does
