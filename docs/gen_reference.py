"""MkDocs hook: the pages that are generated from the code and the committed results at every
build, so that they cannot drift from what they describe.

- reference/config.md   every field of harness.config.RunConfig (and the sections below it):
                        type, constraints, default, and the comments written next to the field
- reference/cli.md      the `--help` of every `python -m harness...` command, as the code prints it
- reference/presets.md  the built-in presets and comparison sets, with their own header comments
- reference/layout.md   the code layout, from each module's docstring
- results/...           benchmarks/results/ as it is committed (pages and plots), with a
                        README.md shown as the folder's index page

mkdocs.yml names this file under `hooks:`. It is excluded from the site (`exclude_docs`).
`python docs/gen_reference.py OUT_DIR` writes the generated pages to a folder, to read them
without building the site.

The field descriptions come from the source comments because that is where this project writes
them (a `Field(description=...)` wins when one is given). Neither MkDocs nor pydantic reads
comments, so the small parser below does: the comment lines directly above a field and the
comment after it on its own line(s).
"""

from __future__ import annotations

import ast
import inspect
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import tokenize
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # document this checkout's code, not an installed copy

from pydantic import BaseModel  # noqa: E402

# The user-facing commands, in the order a reader meets them. Any other module of the package
# that runs as `python -m` is listed after them, so a new command is documented without an edit
# here; INTERNAL ones are entry points the harness starts itself.
COMMANDS = ["harness.loop", "harness.compare", "harness.report", "harness.models", "harness.registry",
            "harness.jobs", "harness.repair", "harness.llm.cache", "harness.serve", "harness.sim"]
INTERNAL = {"harness.providers.local_train", "harness.testing.tiny_model"}
RESULTS = ROOT / "benchmarks" / "results"

# Descriptions of the fields that carry no comment in harness/config.py (a comment or a
# `description=` there wins). A key that names no field stops the build, so these cannot outlive
# a renamed or removed field.
NOTES = {
    "name": "The run's name: the run directory is runs/<name>-<timestamp> unless --run-dir says otherwise.",
    "seed": "The run's seed: problem selection, per-sample seeds, the authors' prompt shuffling, job seeds.",
    "task.name": "The task: generated arithmetic, or GSM8K, MATH, MMLU from the hub or local files.",
    "task.n_train": "Training problems debated per iteration (0: none).",
    "task.n_test": "Test problems; the accuracy's n.",
    "task.seed": "Seed of the problem selection and of generated arithmetic; train and test are disjoint for a seed.",
    "task.arithmetic.terms": "Integers per expression (the paper's a+b*c+d-e*f: 6).",
    "task.arithmetic.low": "Smallest operand.",
    "task.arithmetic.high": "Largest operand.",
    "task.arithmetic.random_operators": "Draw each gap's operator from `operators` instead of using them in order.",
    "endpoint.kind": "Where chat calls go: the built-in simulator (in-process, offline), OpenAI, or vLLM servers.",
    "endpoint.simulator.seed": "Seed of the simulated models' answers.",
    "endpoint.simulator.latency_jitter_ms": "Spread of the injected latency.",
    "endpoint.simulator.job_failure_rate": "Share of fine-tuning jobs that fail.",
    "sampling.temperature": "Sampling temperature (the paper: 1.0). Not sent to reasoning models.",
    "sampling.top_p": "Nucleus sampling; None: the server's default. Not sent to reasoning models.",
    "debate.agents": "N, the number of agents in the society.",
    "debate.rounds": "M, the number of debate rounds (1: each agent answers once, no debate).",
    "debate.mode": "How agents see the others' answers in rounds >= 1: condensed by a summarizer call, or concatenated.",
    "finetune.provider": "Who trains: OpenAI's fine-tuning API (or a service that speaks it), or local LoRA jobs.",
    "finetune.max_example_tokens": "Longest training example kept, in tokens; longer ones are left out of the file.",
    "finetune.poll_interval_s": "Seconds between status checks of running jobs.",
    "finetune.hyperparameters.batch_size": "Examples per training step.",
    "finetune.hyperparameters.learning_rate_multiplier": "OpenAI's multiplier; the local provider scales `finetune.local.learning_rate` by it.",
    "finetune.local.alpha": "LoRA alpha (scaling).",
    "finetune.local.dropout": "LoRA dropout.",
    "finetune.local.target_modules": "Modules that get LoRA weights (PEFT's `target_modules`).",
    "evaluation.agents": "Agents answering the test split; None: `debate.agents`.",
    "evaluation.rounds": "Rounds at test; None: `debate.rounds`.",
    "serve.host": "Interface a managed server listens on (subprocess runner).",
    "serve.port": "Port of a managed server (replica i: port + i).",
    "serve.max_model_len": "vLLM's context length; None: the model's.",
    "serve.dtype": "vLLM's --dtype (on a CPU without native bf16, float32 is faster).",
    "serve.startup_timeout_s": "How long to wait for a managed server's /health.",
    "serve.runner": "Where managed servers run: processes on this machine, or Ray jobs.",
    "serve.ray.num_cpus_per_server": "CPUs reserved per server.",
    "serve.ray.check_resources": "Refuse to start when no node has the resources a server asks for (false for an autoscaling cluster).",
}


# ----------------------------------------------------------------------------- config fields

def _field_comments(cls: type) -> dict[str, str]:
    """{field name: its comments} from the class's source: the comment lines directly above the
    field's line and any comment on the lines of its assignment."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    trailing: dict[int, list[str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            trailing.setdefault(tok.start[0], []).append(tok.string.lstrip("#").strip())
    out: dict[str, str] = {}
    body = ast.parse(src).body[0].body  # type: ignore[attr-defined]
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above: list[str] = []
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith("#"):
            above.insert(0, lines[i].strip().lstrip("#").strip())
            i -= 1
        after = [c for ln in range(node.lineno, (node.end_lineno or node.lineno) + 1) for c in trailing.get(ln, [])]
        text = " ".join(above + after).strip()
        if text:
            out[node.target.id] = text
    return out


def _without_none(ann: Any) -> tuple[Any, bool]:
    if get_origin(ann) in (Union, types.UnionType):
        args = get_args(ann)
        rest = [a for a in args if a is not type(None)]
        if len(rest) < len(args):
            return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return ann, False


def _type_name(ann: Any) -> str:
    origin = get_origin(ann)
    if ann is type(None):
        return "null"
    if origin is Literal:
        return " or ".join(json.dumps(a) for a in get_args(ann))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(ann))
    if origin in (list, tuple, set):
        return f"list of {_type_name(get_args(ann)[0])}" if get_args(ann) else "list"
    if origin is dict:
        args = get_args(ann)
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}" if len(args) == 2 else "mapping"
    if ann is Any:
        return "any"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "section"
    return getattr(ann, "__name__", str(ann).replace("typing.", ""))


def _models_in(ann: Any) -> list[type[BaseModel]]:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in get_args(ann) for m in _models_in(a)]


_CONSTRAINTS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<", "min_length": "length ≥", "max_length": "length ≤"}


def _constraints(field: Any) -> str:
    out = []
    for meta in field.metadata:
        for attr, sign in _CONSTRAINTS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(out)


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return ""
    if isinstance(value, float):
        value = round(value, 4)
    return "`" + json.dumps(value, default=str) + "`"


def _md(text: str) -> str:
    """A source comment as table-cell Markdown: backticks kept, the rest escaped."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for i, part in enumerate(parts):
        if i % 2:
            out.append(part.replace("|", "\\|"))
            continue
        part = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
        out.append(re.sub(r"([\\*_\[\]|])", r"\\\1", part))
    return "".join(out)


def _section_anchor(path: str) -> str:
    return "sec-" + (path.replace(".", "-") or "top")


def config_reference() -> str:
    from harness.config import RunConfig

    sections: list[tuple[str, type[BaseModel]]] = []

    def walk(path: str, model: type[BaseModel]) -> None:
        sections.append((path, model))
        for name, field in model.model_fields.items():
            for sub in _models_in(field.annotation):
                walk(f"{path}.{name}" if path else name, sub)

    walk("", RunConfig)
    known = {f"{p}.{n}" if p else n for p, m in sections for n in m.model_fields}
    stale = sorted(set(NOTES) - known)
    if stale:
        raise RuntimeError(f"docs/gen_reference.py NOTES describe fields RunConfig no longer has: {stale}; "
                           f"remove or rename them")
    out = [
        "# Configuration reference",
        "",
        "Generated from `harness/config.py` (the pydantic model `RunConfig` and the sections below it) "
        "at every build of this site: names, types, limits and defaults are the code's, and each "
        "description is the comment written next to the field. A field is set in a YAML config "
        "(`--config FILE`) or on the command line with `--set section.field=value`; see "
        "[Configuration](../howto/configuration.md). Unknown fields are refused.",
        "",
    ]
    for path, model in sections:
        title = f"`{path}`" if path else "Top level"
        out += [f"## {title} {{#{_section_anchor(path)}}}", ""]
        doc = inspect.getdoc(model)
        if doc and model.__doc__ and "__doc__" in model.__dict__:
            out += [" ".join(doc.split()), ""]
        comments = _field_comments(model)
        out += ["| field | type | default | description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            full = f"{path}.{name}" if path else name
            ann, optional = _without_none(field.annotation)
            subs = _models_in(field.annotation)
            kind = _type_name(ann) + (" or null" if optional else "")
            limits = _constraints(field)
            if limits:
                kind += f" ({limits})"
            desc = field.description or comments.get(name) or NOTES.get(full, "")
            desc = _md(desc)
            if subs:
                link = ", ".join(f"[`{full}`](#{_section_anchor(full)})" for _ in subs[:1])
                desc = (desc + " " if desc else "") + f"Section: see {link}."
            out.append(f"| `{full}` | {_md(kind)} | {_default(field)} | {desc} |")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- presets

def _header_paragraphs(text: str) -> list[str]:
    """A YAML file's leading comment block, as paragraphs (an empty comment line separates them)."""
    paragraphs: list[list[str]] = [[]]
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if body:
            paragraphs[-1].append(body)
        elif paragraphs[-1]:
            paragraphs.append([])
    return [" ".join(p) for p in paragraphs if p]


def presets_reference() -> str:
    presets = ROOT / "harness" / "presets"
    out = [
        "# Presets",
        "",
        "Generated from `harness/presets/` at every build: each preset with its file's own header "
        "comment. A preset is a config file shipped with the harness: "
        "`python -m harness.loop --config NAME`, with `--set` for any field (the fields are in the "
        "[configuration reference](config.md)).",
        "",
    ]
    for title, folder, how in (("Run presets", presets, "python -m harness.loop --config"),
                               ("Comparison sets", presets / "comparisons", "python -m harness.compare --comparison")):
        out += [f"## {title}", ""]
        for f in sorted(folder.glob("*.yaml")):
            out += [f"### `{f.stem}`", "", f"`{how} {f.stem}`", ""]
            for para in _header_paragraphs(f.read_text(encoding="utf-8")) or ["(no header comment)"]:
                out += [_md(para), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- commands

def _cli_modules() -> list[str]:
    found = []
    for path in sorted((ROOT / "harness").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__main__":
            parts.pop()
        elif "__name__ == \"__main__\"" not in path.read_text(encoding="utf-8"):
            continue
        found.append(".".join(parts))
    extra = [m for m in found if m not in COMMANDS and m not in INTERNAL]
    return [m for m in COMMANDS if m in found] + extra


def _help(module: str) -> str:
    env = dict(os.environ, COLUMNS="100", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    env.pop("NO_COLOR", None)
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    text = proc.stdout.strip() or proc.stderr.strip()
    if not text.lower().startswith("usage"):
        raise RuntimeError(f"`python -m {module} --help` printed no usage (exit {proc.returncode}):\n"
                           f"{proc.stdout}\n{proc.stderr}")
    return text


def cli_reference() -> str:
    out = [
        "# Commands",
        "",
        "Generated at every build of this site by running each command with `--help`: this is "
        "exactly what the code prints.",
        "",
    ]
    for module in _cli_modules():
        out += [f"## `python -m {module}`", "", "```text", _help(module), "```", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- code layout

def layout_reference() -> str:
    out = [
        "# Code layout",
        "",
        "Generated from the first paragraph of each module's docstring at every build. Data flows one "
        "way: config → tasks → debate (through `harness.llm`) → ftdata → provider → registry → the next "
        "iteration; `evaluate` and `diversity` read the debate records.",
        "",
        "| module | what it does |",
        "|---|---|",
    ]
    for path in sorted((ROOT / "harness").rglob("*.py")):
        rel = path.relative_to(ROOT)
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc:
            continue
        first = " ".join(doc.split("\n\n")[0].split())
        out.append(f"| `{rel.as_posix()}` | {_md(first)} |")
    out += ["", "Besides the package: `harness/resources/` (prompt templates and small sample files, inside the package), `data/` (notes on the data sets), "
                "`notebooks/` (analysis), `tests/`, `benchmarks/` (scripts and their committed results).", ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------- results

def result_files() -> dict[str, Path]:
    """{site path: file} for everything committed under benchmarks/results/ (README.md as index.md)."""
    out: dict[str, Path] = {}
    if not RESULTS.is_dir():
        return out
    for path in sorted(RESULTS.rglob("*")):
        if not path.is_file():
            continue
        rel = path.relative_to(RESULTS).as_posix()
        if path.name == "README.md":
            rel = rel[: -len("README.md")] + "index.md"
        out[f"results/{rel}"] = path
    return out


def _result_title(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return line[2:].strip()
    return path.stem.replace("_", " ")


def _nested_lists(text: str) -> str:
    """The result files nest lists by two spaces, as GitHub reads them; Python-Markdown wants
    four, or it runs the inner items into the outer one's text."""
    return re.sub(r"^((?:  )+)(?=[-*] |\d+\. )", lambda m: m.group(1) * 2, text, flags=re.M)


def _readme_links(text: str) -> str:
    """A result page's links to a README.md (what GitHub shows) point at its index.md on the site."""
    return re.sub(r"\]\(((?:[^()\s]*/)?)README\.md(#[^)]*)?\)", lambda m: f"]({m.group(1)}index.md{m.group(2) or ''})", text)


def results_index(files: dict[str, Path]) -> str:
    out = [
        "# Benchmark results",
        "",
        "The files committed under `benchmarks/results/`, shown as they are (this list is generated at "
        "every build). Each says its command, the machine and its load.",
        "",
    ]
    for site, path in files.items():
        if site.endswith(".md"):
            out.append(f"- [{_result_title(path)}]({site[len('results/'):]})")
    out.append("")
    return "\n".join(out)


def generated_pages() -> dict[str, str]:
    return {
        "reference/config.md": config_reference(),
        "reference/cli.md": cli_reference(),
        "reference/presets.md": presets_reference(),
        "reference/layout.md": layout_reference(),
        "results/index.md": results_index(result_files()),
    }


# ----------------------------------------------------------------------------- MkDocs hooks

def on_config(config: Any) -> Any:
    """Fill the nav's "Results" section with the committed result pages (they are not known
    until a build looks, and a page left out of the nav fails the strict build)."""
    pages = [site for site in result_files() if site.endswith(".md")]
    for item in config.nav or []:
        if isinstance(item, dict) and "Results" in item:
            entries = item["Results"] if isinstance(item["Results"], list) else [item["Results"]]
            listed = {v for e in entries for v in (e.values() if isinstance(e, dict) else [e])}
            for site in (p for p in pages if p not in listed):  # idempotent: `mkdocs serve` rebuilds
                title = _result_title(result_files()[site]).split(":")[0]  # the nav has little room
                entries.append({title: site})
            item["Results"] = entries
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for site, text in generated_pages().items():
        files.append(File.generated(config, site, content=text))
    for site, path in result_files().items():
        if site.endswith(".md"):
            text = _readme_links(_nested_lists(path.read_text(encoding="utf-8")))
            files.append(File.generated(config, site, content=text))
        else:
            files.append(File.generated(config, site, abs_src_path=str(path)))
    return files


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/gen_reference.py OUT_DIR")
    target = Path(sys.argv[1])
    for site, text in generated_pages().items():
        (target / site).parent.mkdir(parents=True, exist_ok=True)
        (target / site).write_text(text, encoding="utf-8")
        print(target / site)
