"""The GPU estimate as tables: `python -m harness.scaling` (the three ways side by side) and the
"GPU estimate" section of `--dry-run`. The formulas and their sources are in harness.scaling."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.errors import ConfigError, HarnessError
from harness.scaling import (DISK_GB_S, HEADROOM, KNOWN_MODELS, LORA_SERVE_FACTOR, PEAK_TFLOPS, PROCESS_START_S,
                             QUESTION_TOKENS, SERVE_TOKENS_S_8B, SERVER_START_S, Hardware, ModeEstimate, ModelShape,
                             ResidentRatios, Workload, configured_hardware, configured_mode, estimate, hardware,
                             model_shape, resident_ratios, workload)


def assumptions(hw: Hardware, ratios: ResidentRatios) -> list[tuple[str, str, str]]:
    """(what, value, source) of every number the estimate rests on."""
    return [
        ("GPU peak bf16", f"{PEAK_TFLOPS[hw.gpu]:g} TFLOPS ({hw.gpu})", "NVIDIA data sheet, dense tensor cores"),
        ("training FLOPs utilization", f"{hw.mfu:.2f}",
         "MFU published: Llama 3 paper 38-43% on H100 (arxiv.org/abs/2407.21783); PyTorch+IBM 57% for 7B FSDP "
         "on A100 (pytorch.org/blog/maximizing-training-throughput)"),
        ("training FLOPs/token", "full 6P; LoRA 4P + 6 P_lora; + 2P recomputed (activation checkpointing)",
         "Kaplan et al. (arxiv.org/abs/2001.08361)"),
        ("full-FT states", "16 bytes/param / FSDP shards", "ZeRO, mixed-precision AdamW (arxiv.org/abs/1910.02054)"),
        ("activations", "checkpointed: layers x 2sbh + 34sbh + 8sbV bytes", "Korthikanti et al. "
                                                                            "(arxiv.org/abs/2205.05198)"),
        ("vLLM decode, 8B bf16", f"{SERVE_TOKENS_S_8B[hw.gpu]:,.0f} tokens/s per GPU, x 8B/P (at most 2x)",
         "half of MLPerf v5.1 FP8 5,777 tok/s on H100 (Red Hat); A100 half of H100 (Lambda vllm-benchmark)"),
        ("multi-LoRA serving", f"x {LORA_SERVE_FACTOR}", "assumption"),
        ("process start + load", f"{PROCESS_START_S:g} s + weights at {DISK_GB_S:g} GB/s", "assumption"),
        ("vLLM server start", f"{SERVER_START_S:g} s + weights at {DISK_GB_S:g} GB/s", "assumption"),
        ("usable GPU memory", f"{HEADROOM:.0%}" + (f", minus the co-resident server's {hw.serve_share:.0%} for LoRA"
                                                   if hw.serve_share else ""), "assumption"),
        ("resident vs 2N processes", f"wall {ratios.wall_ratio:g}x, memory {ratios.memory_ratio:g}x one job",
         ratios.source),
        ("tokens", f"question {QUESTION_TOKENS}; answer, summary, agreeing share as harness.plan",
         "assumption (the plan's table states them)"),
    ]



# ----------------------------------------------------------------------------- rendering

def _time(hours: float) -> str:
    return f"{hours * 60:.1f} min" if hours < 1 else f"{hours:.2f} h"


def estimate_table(rows: list[ModeEstimate], shape: ModelShape, hw: Hardware, mark: str | None = None) -> Table:
    table = Table(title=f"GPU estimate: {shape.name} ({shape.params / 1e9:.2f}B params), {hw.gpus} x "
                        f"{hw.gpu_memory_gb:g} GB {hw.gpu.upper()}, one iteration",
                  caption="memory in GB per GPU; iteration = training + debates (test and train split) + server "
                          "(re)starts, one after another; * = this config's way")
    for col in ("way", "GPUs/job", "at once", "train GB", "training", "vLLM servers", "serve GB", "debates",
                "loads", "iteration"):
        table.add_column(col, justify="left" if col in ("way", "vLLM servers") else "right")
    for r in rows:
        mem = f"{r.train_memory_gb:.1f}" + ("" if r.fits else " [bold red]NO FIT[/]")
        smem = f"{r.serve_memory_gb:.1f}" + ("" if r.serve_fits else " [bold red]NO FIT[/]")
        table.add_row(("* " if r.key == mark else "") + r.label, str(r.gpus_per_job), str(r.jobs_at_once), mem,
                      _time(r.train_hours), r.servers, smem, _time(r.debate_hours), _time(r.load_hours),
                      _time(r.iteration_hours), style="bold" if r.key == mark else None)
    return table


def assumptions_table(hw: Hardware, ratios: ResidentRatios) -> Table:
    table = Table(title="assumptions of the GPU estimate (docs/scaling.md)")
    for col in ("what", "value", "source"):
        table.add_column(col)
    for row in assumptions(hw, ratios):
        table.add_row(*row, style=None if ratios.measured or "PLACEHOLDER" not in row[2] else "yellow")
    return table


def print_report(console: Console, shape: ModelShape, hw: Hardware, wl: Workload, mark: str | None = None,
                 ratios: ResidentRatios | None = None, full_shards: int | None = None,
                 lora_processes: int = 1, sources: str | None = None) -> list[ModeEstimate]:
    """The table, a note per way, the warning when the configured way (`mark`) does not fit, and
    the assumptions: as a table with their sources, or (`sources`: the command printing them) in one line."""
    ratios = ratios or resident_ratios()
    rows = estimate(shape, hw, wl, ratios, full_shards, lora_processes)
    console.print(estimate_table(rows, shape, hw, mark))
    for r in rows:
        console.print(f"  {r.label}: {r.note}", markup=False)
    if sources is None:
        console.print(assumptions_table(hw, ratios))
    else:
        console.print(f"  assumes {hw.mfu:.0%} FLOPs utilization of {PEAK_TFLOPS[hw.gpu]:g} TFLOPS per GPU, vLLM "
                      f"decoding {SERVE_TOKENS_S_8B[hw.gpu]:,.0f} tokens/s per GPU for an 8B model; every assumption "
                      f"with its source: {sources} (docs/scaling.md)", markup=False)
    if not ratios.measured:
        console.print("[yellow]note:[/] the resident row uses a placeholder ratio until benchmarks/multi_adapter.py "
                      "has written benchmarks/results/multi-adapter/result.json")
    chosen = next((r for r in rows if r.key == mark), None)
    if chosen is not None and not (chosen.fits and chosen.serve_fits):
        fitting = [r.label for r in rows if r.fits and r.serve_fits]
        held = f", {hw.serve_share:.0%} held by the vLLM server" if hw.serve_share and chosen.key != "full" else ""
        why = (f"{chosen.train_memory_gb:.1f} GB per GPU to train, {hw.gpu_memory_gb * HEADROOM:.0f} GB usable{held}"
               if not chosen.fits else f"{chosen.serve_memory_gb:.1f} GB of weights per serving GPU")
        if chosen.key == "full" and not chosen.fits:  # the fewest GPUs per job that would fit
            fewest = next(r for r in estimate(shape, hw, wl, ratios) if r.key == "full")
            if fewest.fits:
                fitting.insert(0, f"finetune.local.processes_per_job={fewest.gpus_per_job}")
        console.print(f"[bold red]warning:[/] {chosen.label} does not fit {hw.gpus} x {hw.gpu_memory_gb:g} GB GPUs "
                      f"({why}); " + (f"what fits: {'; '.join(fitting)}" if fitting
                                      else "no way fits: more or larger GPUs"))
    return rows


def dry_run_section(cfg, console: Console) -> None:
    """`--dry-run`'s "GPU estimate" for local finetuning with a vLLM endpoint; nothing otherwise."""
    if cfg.finetune.provider != "local" or cfg.endpoint.kind != "vllm" or cfg.finetune.iterations == 0:
        return
    model = cfg.finetune.local.base_model_path or cfg.serve.model or ""
    shape = model_shape(model)
    if shape is None:
        console.print(f"GPU estimate: the size of {model or '(serve.model not set)'} is unknown; give "
                      f"serve.model (or finetune.local.base_model_path) as a local folder with its config.json, "
                      f"or see python -m harness.scaling --help", markup=False)
        return
    hw = configured_hardware(cfg)
    local = cfg.finetune.local
    # finetune.local.processes_per_job (GPUs per job) where the config has it: what the run will do.
    processes = getattr(local, "processes_per_job", None)
    print_report(console, shape, hw, workload(cfg), mark=configured_mode(cfg, hw.gpus),
                 full_shards=processes if local.full_finetune else None,
                 lora_processes=1 if local.full_finetune else processes or 1,
                 sources=f"python -m harness.scaling --model {model} --gpus {hw.gpus} "
                         f"--gpu-memory-gb {hw.gpu_memory_gb:g}")


def main(argv: list[str] | None = None) -> int:
    import harness.scaling

    p = argparse.ArgumentParser(prog="python -m harness.scaling", description=harness.scaling.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mistral-7b",
                   help=f"a model name ({', '.join(KNOWN_MODELS)}) or a local folder with config.json")
    p.add_argument("--gpus", type=int, help="GPUs available (default: the config's hardware.gpus, else 8)")
    p.add_argument("--gpu-memory-gb", type=float, help="memory per GPU (default: hardware.gpu_memory_gb, 80)")
    p.add_argument("--config", default="vllm", help="preset or YAML giving the run's sizes (default: vllm, "
                                                    "the paper's 500 problems, 3 agents, 2 rounds, 2 epochs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set hardware.gpu=a100")
    args = p.parse_args(argv)
    console = Console()
    try:
        if args.gpus is not None and args.gpus < 1 or args.gpu_memory_gb is not None and args.gpu_memory_gb <= 0:
            raise ConfigError("--gpus and --gpu-memory-gb must be positive")
        from harness.config import load_config

        cfg = load_config(args.config, args.overrides)
        shape = model_shape(args.model)
        if shape is None:
            raise ConfigError(f"--model {args.model}: unknown size; use one of {', '.join(KNOWN_MODELS)} or a local "
                              f"folder with the model's config.json")
        hw = hardware(cfg, gpus=args.gpus or getattr(getattr(cfg, "hardware", None), "gpus", None) or 8,
                      gpu_memory_gb=args.gpu_memory_gb)
        print_report(console, shape, hw, workload(cfg), mark=configured_mode(cfg, hw.gpus))
    except HarnessError as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}")
        return 2
    return 0

