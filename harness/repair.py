"""`python -m harness.repair RUN_DIR`: mend a run directory whose files were damaged (a disk
error, an editor, a copy cut short) so that `--resume` can continue it.

- Every JSONL file of the run (usage.jsonl, iter-<k>/debate-*.jsonl, ftdata, ...) keeps each
  whole record: a damaged line is dropped, and whole records found inside it (e.g. a record
  glued to a torn one) are kept when they validate as the file's record type. A problem debated
  twice keeps its first record. The damaged original is moved to RUN_DIR/repair-<time>/.
- An empty or unreadable config.yaml is restored from run.json (the settings the run started with).
- Temporary files left by interrupted atomic writes are removed.

Files the loop rebuilds by itself on resume (registry.json from the provider's jobs, diversity.json,
metrics.json, summary.json) are only reported. `--dry-run` reports without changing anything.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from harness.fileio import remove_stale_temps, split_lines, write_atomic
from harness.records import DebateRecord, UsageRecord

# Folders whose files belong to other processes (training jobs, the simulator) or to earlier repairs.
_SKIP = ("local-jobs", "simulator")


@dataclass
class FileRepair:
    path: Path  # relative to the run directory
    records: int = 0  # whole records kept
    dropped: list[int] = field(default_factory=list)  # line numbers removed
    salvaged: int = 0  # whole records recovered from inside damaged lines
    duplicates: int = 0  # repeated problems removed (debate files)

    @property
    def changed(self) -> bool:
        return bool(self.dropped or self.duplicates)


def record_type(rel: Path) -> type[BaseModel] | None:
    """The record model of a run's JSONL file, where the run-directory contract names one."""
    if rel.name == "usage.jsonl" and len(rel.parts) == 1:
        return UsageRecord
    if rel.name.startswith("debate-") and rel.parent.name.startswith("iter-"):
        return DebateRecord
    return None


def _valid(obj: object, model: type[BaseModel] | None) -> bool:
    if not isinstance(obj, dict):
        return False
    if model is None:
        return True
    try:
        model.model_validate(obj)
    except ValidationError:
        return False
    return True


def _salvage(text: str, model: type[BaseModel]) -> list[str]:
    """Whole records inside a damaged line: JSON objects starting at any '{' that validate as
    `model` and hold no undecodable byte. Only typed files are salvaged, since a fragment of a
    torn record can itself be a valid JSON object."""
    decoder = json.JSONDecoder()
    found, i = [], text.find("{")
    while i != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        piece = text[i:end]
        clean = True
        try:
            piece.encode("utf-8")
        except UnicodeEncodeError:  # an undecodable byte (kept as a surrogate) inside the record
            clean = False
        if clean and _valid(obj, model):
            found.append(piece)
            i = text.find("{", end)
        else:
            i = text.find("{", i + 1)
    return found


def _dedupe_key(obj: dict, model: type[BaseModel] | None) -> str | None:
    if model is DebateRecord:
        return str((obj.get("problem") or {}).get("id"))
    return None


def scan(path: Path, rel: Path) -> tuple[FileRepair, bytes]:
    """The report and the repaired content of one JSONL file."""
    model = record_type(rel)
    report = FileRepair(rel)
    kept: list[str] = []
    seen: set[str] = set()
    lines = split_lines(path.read_bytes())
    for i, raw in enumerate(lines, start=1):
        text = raw.decode("utf-8", errors="surrogateescape").rstrip("\n")
        if not text.strip():
            continue
        pieces: list[str] = []
        try:
            text.encode("utf-8")
            obj = json.loads(text)
            if _valid(obj, model):
                pieces = [text]
        except (UnicodeEncodeError, json.JSONDecodeError):
            pass
        if not pieces:
            report.dropped.append(i)
            if model is not None:
                pieces = _salvage(text, model)
                report.salvaged += len(pieces)
        for piece in pieces:
            key = _dedupe_key(json.loads(piece), model)
            if key is not None and key in seen:
                report.duplicates += 1
                continue
            if key is not None:
                seen.add(key)
            kept.append(piece)
    report.records = len(kept)
    return report, "".join(p + "\n" for p in kept).encode("utf-8")


def _config_problem(run_dir: Path) -> str | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "missing"
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        return f"unreadable ({str(e).splitlines()[0]})"
    if not data:
        return "empty"
    if not isinstance(data, dict):
        return "not a mapping of fields"
    return None


def repair(run_dir: Path, *, dry_run: bool = False) -> tuple[list[FileRepair], list[str]]:
    """Repair `run_dir` in place (or only report, with `dry_run`): (JSONL reports, other notes)."""
    from harness.identity import config_header, load_identity

    run_dir = Path(run_dir)
    notes: list[str] = []
    backup = run_dir / f"repair-{time.strftime('%Y%m%d-%H%M%S')}"
    reports = []
    for path in sorted(run_dir.rglob("*.jsonl")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in _SKIP or rel.parts[0].startswith("repair-"):
            continue
        report, content = scan(path, rel)
        reports.append(report)
        if report.changed and not dry_run:
            (backup / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, backup / rel)
            write_atomic(path, content)

    problem = _config_problem(run_dir)
    if problem is not None:
        identity = load_identity(run_dir)
        if identity is None:
            notes.append(f"config.yaml is {problem} and there is no readable run.json to restore it from; "
                         f"write the run's settings back by hand")
        else:
            notes.append(f"config.yaml was {problem}: restored from run.json (the settings the run started with)")
            if not dry_run:
                if (run_dir / "config.yaml").is_file():
                    backup.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(run_dir / "config.yaml", backup / "config.yaml")
                import yaml

                write_atomic(run_dir / "config.yaml",
                             config_header(identity.run) + yaml.safe_dump(identity.config, sort_keys=False))
    for name, what in (("registry.json", "rebuilds it from the provider's jobs"),
                       ("summary.json", "writes it again"), ("run.json", "recovers it from registry.json")):
        path = run_dir / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                notes.append(f"{name} is damaged: the next --resume {what}")
    for path in sorted(run_dir.glob("iter-*/diversity.json")):
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            notes.append(f"{path.relative_to(run_dir)} is damaged: the next --resume computes it again")
    if not dry_run:
        temps = remove_stale_temps(run_dir, skip=_SKIP)
        if temps:
            notes.append(f"removed {len(temps)} temporary file(s) left by interrupted writes")
    if any(r.changed for r in reports) and not dry_run:
        notes.append(f"the damaged originals are in {backup}")
    return reports, notes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.repair", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="the run directory (runs/<name>)")
    p.add_argument("--dry-run", action="store_true", help="report what would change; change nothing")
    args = p.parse_args(argv)
    run_dir: Path = args.run_dir
    if not (run_dir / "config.yaml").exists() and not (run_dir / "run.json").exists():
        print(f"error: {run_dir} is not a run directory (no config.yaml or run.json)", file=sys.stderr)
        return 2
    from harness.fileio import DirLock
    from harness.errors import HarnessError

    try:
        with DirLock(run_dir):
            reports, notes = repair(run_dir, dry_run=args.dry_run)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as e:  # the run directory cannot be written (full, read-only)
        from harness.ioerrors import explain

        print(f"error: {explain(e, run_dir)}", file=sys.stderr)
        return 1
    verb = "would drop" if args.dry_run else "dropped"
    damaged = [r for r in reports if r.changed]
    for r in damaged:
        lines = ", ".join(map(str, r.dropped[:10])) + (" ..." if len(r.dropped) > 10 else "")
        print(f"{r.path}: kept {r.records} whole records; {verb} line(s) {lines or '-'}"
              + (f"; recovered {r.salvaged} record(s) from inside them" if r.salvaged else "")
              + (f"; {r.duplicates} repeated problem(s) removed" if r.duplicates else ""))
    for note in notes:
        print(note)
    if not damaged and not notes:
        print(f"nothing to repair: {len(reports)} JSONL files hold only whole records")
    elif not args.dry_run:
        print(f"continue the run with: python -m harness.loop --resume {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
