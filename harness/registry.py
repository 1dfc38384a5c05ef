"""The run's model registry, runs/<run>/registry.json (DESIGN §5): which model each agent uses
for each role at each iteration, and the job, file and data that produced it.

Convention: an entry with `iteration` k holds the model used in iteration k's debate, i.e. the
one finetuned on iteration k-1's data. Iteration 0 is the base model (no entry needed). An
agent whose data was too small gets an entry with status "kept" and the model it carries on
with, and a note saying why.

`python -m harness.registry RUN_DIR` prints the registry as a table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.errors import DataError, HarnessError
from harness.fileio import write_model

RoleName = Literal["generator", "critic"]
EntryStatus = Literal["pending", "validating_files", "queued", "running", "paused", "succeeded", "failed",
                      "cancelled", "unknown", "kept"]
USABLE = ("succeeded", "kept")  # statuses whose model_id the debate may use


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    iteration: int = Field(ge=0)
    role: RoleName
    agent: int = Field(ge=0)
    model_id: str | None = None  # the finetuned model (or the kept one); None until succeeded
    provider: str | None = None
    parent_model: str | None = None  # the model this one was finetuned from
    job_id: str | None = None
    file_id: str | None = None
    data_path: str | None = None  # relative to the run directory
    data_sha256: str | None = None
    n_examples: int | None = None
    trained_tokens: int | None = None
    status: EntryStatus = "pending"
    error: str | None = None  # the provider's own message when the job failed
    note: str | None = None  # e.g. "kept iteration 0 model: 4 examples < 10"
    created_at: float = Field(default_factory=time.time)
    finished_at: float | None = None

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.iteration, self.role, self.agent)

    @property
    def usable(self) -> bool:
        return self.status in USABLE and self.model_id is not None


class Registry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = 1
    run: str
    base_model: str
    entries: list[ModelEntry] = Field(default_factory=list)

    def get(self, iteration: int, role: str, agent: int) -> ModelEntry | None:
        for e in self.entries:
            if e.key == (iteration, role, agent):
                return e
        return None

    def upsert(self, entry: ModelEntry) -> ModelEntry:
        """Insert, or replace the entry with the same (iteration, role, agent)."""
        self.entries = [e for e in self.entries if e.key != entry.key] + [entry]
        self.entries.sort(key=lambda e: (e.iteration, e.role != "generator", e.agent))
        return entry

    def model_for(self, iteration: int, role: str, agent: int) -> str:
        """The model agent `agent` uses as `role` at `iteration`: its own usable entry there, or
        the latest usable one before it, or the base model. A failed job never becomes a model."""
        for it in range(iteration, 0, -1):
            e = self.get(it, role, agent)
            if e is not None and e.usable:
                return e.model_id  # type: ignore[return-value]
        return self.base_model

    def models_for(self, iteration: int, n_agents: int) -> tuple[list[str], list[str]]:
        """(generators, critics), one model id per agent, for iteration `iteration`'s debate."""
        return ([self.model_for(iteration, "generator", n) for n in range(n_agents)],
                [self.model_for(iteration, "critic", n) for n in range(n_agents)])

    # ------------------------------------------------------------------ persistence

    @classmethod
    def load(cls, path: Path) -> "Registry":
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: no registry here; is this a run directory (runs/<name>)?")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e}); `python -m harness.loop --resume {path.parent}` "
                            f"rebuilds it from the provider's jobs (the run id is also kept in run.json)") from e
        try:
            reg = cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(top level)"
            raise DataError(f"{path}: field '{field}': {first['msg']}") from e
        keys = [e.key for e in reg.entries]
        dup = next((k for k in keys if keys.count(k) > 1), None)
        if dup is not None:
            raise DataError(f"{path}: field 'entries': two entries for iteration {dup[0]}, "
                            f"{dup[1]}, agent {dup[2]}")
        return reg

    @classmethod
    def load_or_create(cls, path: Path, *, run: str, base_model: str) -> "Registry":
        path = Path(path)
        return cls.load(path) if path.exists() else cls(run=run, base_model=base_model)

    def save(self, path: Path) -> None:
        write_model(Path(path), self)

    # ------------------------------------------------------------------ display

    def table(self):
        """One row per model; the short columns never wrap, the model id and job id fold."""
        from rich import box
        from rich.table import Table

        t = Table(title=f"models of run {self.run} (base: {self.base_model})", box=box.SIMPLE_HEAD,
                  pad_edge=False, padding=(0, 1, 0, 0))
        for col in ("it", "role", "agent", "status", "examples", "tokens"):
            t.add_column(col, no_wrap=True, justify="left" if col in ("role", "status") else "right")
        t.add_column("model · job · note", overflow="fold", ratio=1)
        colors = {"succeeded": "green", "failed": "red", "cancelled": "red", "kept": "yellow"}
        for e in self.entries:
            status = f"[{colors[e.status]}]{e.status}[/]" if e.status in colors else e.status
            detail = " · ".join(x for x in (e.model_id, e.job_id, e.error or e.note) if x) or "-"
            t.add_row(str(e.iteration), e.role, str(e.agent), status, _num(e.n_examples),
                      _num(e.trained_tokens), detail)
        return t

    def print(self, console=None) -> None:
        from rich.console import Console

        (console or Console()).print(self.table())


def _num(v: int | None) -> str:
    return "-" if v is None else f"{v:,}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m harness.registry RUN_DIR  (or a path to registry.json)")
        return 2
    target = Path(args[0])
    path = target / "registry.json" if target.is_dir() else target
    try:
        Registry.load(path).print()
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
