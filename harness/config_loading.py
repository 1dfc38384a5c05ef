"""Reading a run config: presets by name or YAML files, `--set` overrides, and the message a
validation error becomes (the file, the field, what is allowed).

The functions take the config model as an argument, so this module never imports harness.config
(which imports it): harness.config binds them to RunConfig (`load_config`, `config_from_data`)
and re-exports the rest, so users import everything from harness.config.
"""

from __future__ import annotations

import copy
import re
import types
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from harness.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def _named_files(folder: str) -> list[str]:
    root = resources.files("harness.presets")
    if folder:
        root = root / folder
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_names() -> list[str]:
    return _named_files("")


def read_yaml_source(source: str, *, folder: str = "", what: str = "preset") -> tuple[dict, str]:
    """A YAML mapping from a file path, or from a named file shipped in harness/presets/<folder>
    (presets; comparison sets); returns (data, label used in error messages)."""
    names = ", ".join(_named_files(folder))
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist (built-in {what}s: {names})")
        label = str(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{what} file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    else:
        res = resources.files("harness.presets")
        res = (res / folder if folder else res) / f"{source}.yaml"
        if not res.is_file():
            raise ConfigError(f"{source!r} is neither a file nor a built-in {what}; built-in {what}s: {names}")
        label, text = f"{what} '{source}'", res.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {e}") from e
    if data is None:
        # An empty file is a mistake (a save cut short, the wrong file), not a request for defaults.
        raise ConfigError(f"{label}: the file is empty (no settings at all); write the fields that differ from the "
                          f"defaults (e.g. `task: {{n_test: 50}}`), or name a built-in {what} ({names})")
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data, label


class _OverrideLoader(yaml.SafeLoader):
    """SafeLoader that also reads 1e-4 and 5E3 as floats. YAML 1.1 wants a dot and a signed
    exponent (1.0e-4), so PyYAML leaves these as strings, which a float field rejects and an
    untyped one (sampling.extra_body) would pass on as text. Being a resolver, it applies at any
    depth ({min_p: 1e-4}) and only to plain scalars: a quoted '1e-4' stays a string."""


_OverrideLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789.")
)


def _without_none(ann: Any) -> Any:
    """`X | None` -> X, so that an optional section or dict is recognised as one."""
    if get_origin(ann) in (Union, types.UnionType):
        args = [a for a in get_args(ann) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return ann


def _override_path(root: type[BaseModel], parts: list[str]) -> tuple[list[str], Any]:
    """The keys to set in the config data, and the annotation of the value set (None: unknown).

    Below a dict-valued field the rest of the dotted path is ONE key, since dict keys may hold
    dots themselves (prices.gpt-4.1-mini). Found from the models, so new dict fields just work."""
    model: Any = root
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return parts, None  # unknown field or a value's sub-key: validation names the problem
        ann = _without_none(field.annotation)
        if get_origin(ann) is dict and i + 1 < len(parts):
            args = get_args(ann)
            return parts[: i + 1] + [".".join(parts[i + 1 :])], args[1] if len(args) == 2 else None
        model = ann
    return parts, model


def _apply_override(root: type[BaseModel], data: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. debate.agents=5")
    key, raw = item.split("=", 1)
    try:
        value = yaml.load(raw, Loader=_OverrideLoader) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts, target = _override_path(root, key.strip().split("."))
    if _without_none(target) is str and isinstance(value, (bool, int, float)):
        value = raw.strip()  # a text field given 1, 1e5 or yes (serve.env.X=1) keeps the text
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
        node = nxt
    node[parts[-1]] = value


def _explain(root: type[BaseModel], e: ValidationError, label: str) -> str:
    lines = [f"invalid configuration in {label}:"]
    for err in e.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            allowed = _allowed_fields(root, err["loc"][:-1])
            msg = f"unknown field; allowed here: {', '.join(allowed)}"
        elif "input" in err and err["type"] not in ("missing",):
            msg = f"{msg} (got {err['input']!r})"
        lines.append(f"  field '{field}': {msg}")
    return "\n".join(lines)


def _allowed_fields(root: type[BaseModel], loc: tuple) -> list[str]:
    model: type[BaseModel] = root
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def load_model(model: type[M], source: str | None = None, overrides: list[str] | None = None) -> M:
    """Load a preset name or YAML path (default: the `demo` preset) as `model`, with `--set` overrides."""
    data, label = read_yaml_source(source or "demo")
    return validate_data(model, data, label, overrides)


def validate_data(model: type[M], data: dict, label: str, overrides: list[str] | None = None) -> M:
    """Validate config data (as read from YAML) after applying `--set` overrides; errors name `label`."""
    data = copy.deepcopy(data)
    for item in overrides or []:
        _apply_override(model, data, item)
    if overrides:
        label += f" with --set {' '.join(overrides)}"
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_explain(model, e, label)) from None


def config_to_yaml(cfg: BaseModel) -> str:
    """The resolved config as saved in the run directory. It holds no secrets by construction:
    keys are read from the environment variable the config names."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
