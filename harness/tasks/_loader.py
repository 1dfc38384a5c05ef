"""Shared loading for the data-set tasks: local JSONL / JSON / Parquet files or Hugging Face Hub
data sets, validation with errors that name file, line/row and field, and seeded, disjoint
train/test sampling."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import socket
import threading
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Literal
from urllib.parse import urlparse

from harness.config import TaskConfig
from harness.errors import DataError
from harness.records import Problem

log = logging.getLogger("harness.tasks")

Split = Literal["train", "test"]
# A record and where it came from ("path line 3", "repo[config] test row 7"), for error messages.
Located = tuple[str, dict[str, Any]]

LOCAL_HINT = (
    "point the harness at local files instead: --set task.source=/path/train.jsonl "
    "--set task.test_source=/path/test.jsonl (JSONL or Parquet; see data/README.md)"
)
_HUB_ID_RE = re.compile(r"^[\w.-]+/[\w.-]+(?::[\w.,-]+)?$")
_LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".pq")


def problem_id(task: str, question: str) -> str:
    """Stable across runs and sources (a hash of the question text), unique after deduplication."""
    return f"{task}-{hashlib.sha1(question.strip().encode('utf-8')).hexdigest()[:12]}"


def require(rec: dict[str, Any], field: str, where: str, hint: str = "") -> Any:
    value = rec.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{where}: missing required field '{field}'" + (f" ({hint})" if hint else ""))
    return value


# ----------------------------------------------------------------------------- sources

def is_local(source: str) -> bool:
    p = Path(source).expanduser()
    return p.exists() or source.lower().endswith(_LOCAL_SUFFIXES) or source.startswith(("/", ".", "~"))


def read_source(source: str, hub_split: str, what: str = "") -> list[Located]:
    """Records of a local file, or of split `hub_split` of a hub id ("owner/name[:config]")."""
    if is_local(source):
        return read_local(Path(source).expanduser())
    if not _HUB_ID_RE.match(source):
        raise DataError(f"task source {source!r} is neither an existing file nor a hub id (owner/name); {LOCAL_HINT}")
    repo, _, config = source.partition(":")
    return hub_records(repo, config or None, hub_split, what)


def read_local(path: Path) -> list[Located]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check task.source / task.test_source")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - any reader error is a bad file for the user
            raise DataError(f"{path}: not a readable Parquet file ({e})") from e
        return [(f"{path} row {i} (0-based)", r) for i, r in enumerate(rows)]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {e.start} of the file is {data[e.start]:#04x}); "
                        f"save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl) and "
                        f"point task.source / task.test_source at it") from None
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        out = [(f"{path} item {i} (0-based)", r) for i, r in enumerate(items)]
    else:
        out = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append((f"{path} line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {i}: not valid JSON ({e.msg}); expected one JSON object per line") from e
    for where, rec in out:
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object with named fields, got {type(rec).__name__}")
    return out


def _hub_reachable(timeout_s: float = 4.0) -> str | None:
    """None when a TCP connection to the hub (or the configured proxy) opens quickly, else why not.

    Without this check `datasets` retries for ~25 s before failing on a machine without
    internet; the check runs in a thread because name resolution has no timeout of its own."""
    url = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    u = urlparse(url if "://" in url else f"http://{url}")
    host, port = u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)
    result: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout_s).close()
            result.append(None)
        except OSError as e:
            result.append(f"cannot connect to {host}:{port} ({e})")

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout_s + 1)
    return result[0] if result else f"no answer from {host}:{port} within {timeout_s:.0f}s"


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=32)
def _hub_rows(repo: str, config: str | None, split: str) -> tuple[dict[str, Any], ...]:
    if not _offline():
        why = _hub_reachable()
        if why:
            raise DataError(f"cannot load {repo} from the Hugging Face Hub: {why}. You can {LOCAL_HINT}, "
                            "or set HF_HUB_OFFLINE=1 to use a copy already in the Hugging Face cache")
    try:
        import datasets

        ds = datasets.load_dataset(repo, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, missing repo/config/split: all need the same advice
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        raise DataError(f"cannot load {repo}" + (f" (config {config})" if config else "")
                        + f" split '{split}' from the Hugging Face Hub: {msg}. You can {LOCAL_HINT}") from e
    return tuple(ds)


def hub_records(repo: str, config: str | None, split: str, what: str = "") -> list[Located]:
    log.info("loading %s%s split %s from the Hugging Face Hub %s", repo, f"[{config}]" if config else "", split, what)
    label = f"{repo}[{config}]" if config else repo
    return [(f"{label} {split} row {i}", r) for i, r in enumerate(_hub_rows(repo, config, split))]


# ----------------------------------------------------------------------------- sampling

@dataclass(frozen=True)
class HubDefault:
    """Where a task's problems come from when the config names no source."""

    repo: str
    configs: tuple[str | None, ...]  # concatenated in this order
    splits: dict[str, str]  # our split -> the hub's split name


def _dedupe(problems: Iterable[Problem]) -> list[Problem]:
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.id not in seen:
            seen.add(p.id)
            out.append(p)
    return out


def _shuffled(pool: list[Problem], seed: int, salt: str) -> list[Problem]:
    order = list(pool)
    random.Random(f"{salt}:{seed}").shuffle(order)  # str seeds hash deterministically (sha512)
    return order


def load_problems(
    name: str,
    cfg: TaskConfig,
    split: Split,
    default: HubDefault,
    convert: Callable[[Located], Problem | None],
) -> list[Problem]:
    """The `split` problems of a data-set task: seeded, deterministic, disjoint from the other split.

    - `source` is a local file and `test_source` is unset: that one file is split in two.
    - otherwise train comes from `source` (default: the hub's train split) and test from
      `test_source` (default: the test split of the `source` hub id, or of the task's default);
      train problems whose question also appears on the test side are dropped.
    `convert` turns a located record into a Problem, None to filter it out, or raises DataError."""

    def pool_of(records: list[Located]) -> list[Problem]:
        return _dedupe(p for p in map(convert, records) if p is not None)

    def default_pool(which: Split) -> list[Problem]:
        hub_split = default.splits[which]
        records: list[Located] = []
        for config in default.configs:
            records += hub_records(default.repo, config, hub_split, f"for the {which} split")
        return pool_of(records)

    n_want = cfg.n_train if split == "train" else cfg.n_test
    if cfg.source and cfg.test_source is None and is_local(cfg.source):
        pool = _shuffled(pool_of(read_source(cfg.source, "")), cfg.seed, f"{name}:split")
        total = cfg.n_train + cfg.n_test
        n_test = cfg.n_test
        if total > len(pool):
            n_test = round(len(pool) * cfg.n_test / total) if total else 0
            log.warning("%s: %s holds %d usable problems, fewer than n_train + n_test = %d; using %d for test and %d for train",
                        name, cfg.source, len(pool), total, n_test, min(cfg.n_train, len(pool) - n_test))
        test = pool[:n_test]
        chosen = test if split == "test" else pool[n_test : n_test + cfg.n_train]
        if n_want and not chosen:
            raise _too_few(name, split, n_want, f"{cfg.source} holds {len(pool)} usable problem(s)"
                           + (f", fewer than task.n_train + task.n_test = {total}, split in proportion"
                              if total > len(pool) else "")
                           + (f", {len(test)} of them kept for test" if split == "train" else ""), "task.source")
        return chosen

    def source_pool(source: str | None, which: Split) -> list[Problem]:
        if source is None or source == default.repo:  # the default hub id: all its configs
            return default_pool(which)
        return pool_of(read_source(source, default.splits[which], f"for the {which} split"))

    def test_pool() -> list[Problem]:
        # no test_source: a hub id's own test split, or the task's default
        return source_pool(cfg.test_source or cfg.source, "test")

    if split == "test":
        pool = test_pool()
    else:
        pool = source_pool(cfg.source, "train")
        held_out = {p.id for p in test_pool()}
        before = len(pool)
        pool = [p for p in pool if p.id not in held_out]
        if before != len(pool):
            log.warning("%s: dropped %d training problems that also appear in the test data", name, before - len(pool))
    pool = _shuffled(pool, cfg.seed, f"{name}:{split}")
    if n_want and not pool:
        source = (cfg.test_source or cfg.source) if split == "test" else cfg.source
        field = ("task.test_source" if cfg.test_source else "task.source") if split == "test" else "task.source"
        raise _too_few(name, split, n_want, f"{source or default.repo} holds no usable {split} problems", field)
    if n_want > len(pool):
        log.warning("%s: only %d %s problems available, fewer than the %d asked for; using all of them",
                    name, len(pool), split, n_want)
    return pool[:n_want]


def _too_few(name: str, split: Split, n_want: int, what: str, field: str) -> DataError:
    """An empty split is refused: evaluating (or training on) 0 problems reports nothing."""
    return DataError(f"{name}: no {split} problems to {'evaluate' if split == 'test' else 'train on'} "
                     f"(task.n_{split} = {n_want}): {what}. Point {field} at a file with problems "
                     f"(one JSON object per line; see data/README.md)")


def data_dir() -> Path:
    """The bundled fixtures (harness/resources/data/), inside the package so that a wheel ships
    them; an installed wheel is unpacked on disk, so this is a real folder."""
    return Path(str(resources.files("harness") / "resources" / "data"))
