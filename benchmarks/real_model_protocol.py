"""The pre-registered protocol of the real-model comparison (benchmarks/results/real-model/protocol.yaml):
everything fixed before any test problem is debated: task, sizes, seeds, every sampling and
training setting, the methods, the family of comparisons and the multiplicity correction.

Settings that are tuned (e.g. sampling.temperature) are listed under `tuned` with their candidates
and the rule that picks one; `benchmarks/real_model.py --tune` debates the DEV problems only
(iteration 0, every candidate), writes the numbers to `dev_results` and the chosen value must then
be written into `chosen` by hand before `--seed-index` will run a seed.

Splits of seed s (task.seed = s, run seed = s): the test split is the task's seeded test draw;
train is the task's seeded train draw (disjoint from test); DEV is carved from the same train
stream after the train problems, leaving out every protocol seed's test problems, so no test
problem of any seed can enter tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from harness.config import RunConfig, load_config
from harness.errors import ConfigError
from harness.records import Problem
from harness.tasks import load_split


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Sizes(_Strict):
    n_train: int = Field(ge=1)
    n_dev: int = Field(ge=1)  # per seed; tuning pools the dev problems of every seed
    n_test: int = Field(ge=48)


class Tuned(_Strict):
    candidates: list[float | int | str] = Field(min_length=1)
    rule: str  # how `chosen` follows from the dev numbers, written before they exist
    chosen: float | int | str | None = None  # None: to be filled by --tune before any test run
    dev_results: str | None = None  # the file --tune wrote, relative to the protocol file
    # The numbers that justified `chosen`: pooled dev final-vote accuracy per candidate, as --tune
    # printed them (checked against dev_results before a seed runs).
    dev_accuracy: dict[str, float] | None = None


class Method(_Strict):
    label: str
    sets: list[str] = Field(default_factory=list)  # KEY=VALUE on top of the settings


class Comparison(_Strict):
    """a − b on the same (seed, problem) pairs. `debate` at iteration 0 is the baseline."""

    a: str
    a_iteration: int
    b: str
    b_iteration: int
    vote: Literal["final", "first_round"] = "final"
    why: str = ""

    @property
    def label(self) -> str:
        return f"{self.a} it{self.a_iteration} − {self.b} it{self.b_iteration}" + \
            (" (first-round vote)" if self.vote == "first_round" else "")


class Protocol(_Strict):
    name: str
    preset: str  # the harness preset every method starts from
    task_level: str  # in words, for the reader; the settings below fix it
    sizes: Sizes
    seeds: list[int] = Field(min_length=1)
    iterations: int = Field(ge=1)
    settings: dict[str, Any]  # every sampling, debate and training setting, dotted keys
    tuned: dict[str, Tuned] = Field(default_factory=dict)
    methods: dict[str, Method]
    comparisons: list[Comparison] = Field(min_length=1)  # the pre-registered family
    correction: Literal["holm"] = "holm"
    confidence: float = Field(0.95, gt=0, lt=1)

    @model_validator(mode="after")
    def _check(self) -> "Protocol":
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {self.seeds}: a seed is listed twice")
        if "debate" in self.methods:
            raise ValueError("methods: 'debate' is iteration 0 of every method; do not list it")
        known = {"debate", *self.methods}
        for c in self.comparisons:
            for m, k in ((c.a, c.a_iteration), (c.b, c.b_iteration)):
                if m not in known:
                    raise ValueError(f"comparison {c.label}: unknown method {m!r}; known: {', '.join(sorted(known))}")
                if (m == "debate") != (k == 0) or k > self.iterations:
                    raise ValueError(f"comparison {c.label}: {m} has no iteration {k} (debate is iteration 0, "
                                     f"methods 1..{self.iterations})")
        clash = set(self.tuned) & set(self.settings)
        if clash:
            raise ValueError(f"{sorted(clash)} is both tuned and fixed in settings; keep it in one place")
        return self

    def untuned(self) -> list[str]:
        return [k for k, t in self.tuned.items() if t.chosen is None]

    def sets(self, seed: int, method: str | None = None, *, tuned: dict[str, Any] | None = None) -> list[str]:
        """--set overrides of one method's run for one seed (sizes, seeds, settings, tuned values)."""
        values = {k: t.chosen for k, t in self.tuned.items()} if tuned is None else tuned
        if any(v is None for v in values.values()):
            raise ConfigError(f"protocol {self.name}: {self.untuned()} not chosen yet; run "
                              f"`python benchmarks/real_model.py --protocol FILE --tune`, then write the chosen "
                              f"value into tuned.<key>.chosen by its rule")
        out = [f"task.seed={seed}", f"seed={seed}", f"task.n_train={self.sizes.n_train}",
               f"task.n_test={self.sizes.n_test}", f"finetune.iterations={self.iterations}"]
        out += [f"{k}={_yaml_value(v)}" for k, v in {**self.settings, **values}.items()]
        return out + (self.methods[method].sets if method else [])

    def config(self, seed: int, method: str | None = None, *, tuned: dict[str, Any] | None = None) -> RunConfig:
        return load_config(self.preset, self.sets(seed, method, tuned=tuned))


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("\n...").strip()


def load_protocol(path: Path) -> Protocol:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such protocol file; the committed one is "
                          f"benchmarks/results/real-model/protocol.yaml") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        return Protocol.model_validate(data)
    except ValidationError as e:
        lines = [f"  {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise ConfigError(f"{path}: invalid protocol:\n" + "\n".join(lines)) from None


def dev_problems(protocol: Protocol, seed: int) -> list[Problem]:
    """Seed `seed`'s DEV split: the train stream's problems after the first n_train, minus every
    protocol seed's test problems (so tuning never sees a test problem), the first n_dev left."""
    s = protocol.sizes
    cfg = protocol.config(seed, tuned={k: t.candidates[0] for k, t in protocol.tuned.items()}).task
    tests = {p.id for other in protocol.seeds for p in load_split(cfg.model_copy(update={"seed": other}), "test")}
    spare = s.n_test * len(protocol.seeds)
    longer = cfg.model_copy(update={"n_train": s.n_train + s.n_dev + spare})
    dev = [p for p in load_split(longer, "train")[s.n_train:] if p.id not in tests][:s.n_dev]
    if len(dev) < s.n_dev:
        raise ConfigError(f"protocol {protocol.name}: only {len(dev)} dev problems left for seed {seed} "
                          f"(sizes.n_dev = {s.n_dev}); lower the sizes or widen the task")
    return dev
