"""An audit of user mistakes through the real CLI (`python -m harness.loop`): each one must end
with a non-zero exit, no traceback, and a message naming the field or file to fix.

The cases run concurrently (each is its own process) and are checked one by one. Endpoint
mistakes use small servers on 127.0.0.1 that answer every request the same wrong way
(tests/bad_endpoint.py); after them, every request the run sent must be closed in its journal
as refused, so none is reported as possibly billed at the next start."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from bad_endpoint import BadEndpoint
from conftest import REPO

SMALL = ["--set", "task.n_test=3", "--set", "finetune.iterations=0"]
OPENAI = ["--set", "endpoint.kind=openai", "--set", "models.base=gpt-4o-mini", *SMALL]


@dataclass
class Case:
    args: list[str]
    expect: list[str]  # every one of these appears in the output (the field, the file, the fix)
    env: dict[str, str] = field(default_factory=dict)
    journal: Path | None = None  # a run directory whose journal must hold no open or counted request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(case: Case, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "OPENAI_API_KEY": "sk-test", **case.env}
    return subprocess.run([sys.executable, "-m", "harness.loop", *case.args], cwd=cwd, capture_output=True,
                          text=True, timeout=240, env=env)


def _cases(tmp: Path, servers: dict[str, BadEndpoint], finished_run: Path) -> dict[str, Case]:
    (tmp / "bad.yaml").write_text("task: [unclosed\n")
    (tmp / "empty.yaml").write_text("")
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp / "a-file").write_text("not a folder\n")
    (tmp / "not-a-run").mkdir()
    cases = {
        "bad YAML": Case(["--config", "bad.yaml"], ["bad.yaml", "not valid YAML"]),
        "empty YAML": Case(["--config", "empty.yaml"], ["empty.yaml", "empty"]),
        "YAML not a mapping": Case(["--config", "list.yaml"], ["list.yaml", "mapping"]),
        "YAML not UTF-8": Case(["--config", "latin1.yaml"], ["latin1.yaml", "UTF-8"]),
        "missing config file": Case(["--config", "nowhere.yaml"], ["nowhere.yaml", "does not exist"]),
        "nonexistent preset": Case(["--config", "no-such-preset"], ["no-such-preset", "built-in"]),
        "unknown field": Case(["--set", "debate.agentz=3"], ["debate.agentz", "unknown field"]),
        "unknown section": Case(["--set", "debat.agents=3"], ["debat", "unknown field"]),
        "wrong type": Case(["--set", "debate.agents=three"], ["debate.agents", "three"]),
        "out of range": Case(["--set", "debate.rounds=0"], ["debate.rounds"]),
        "bad --set syntax": Case(["--set", "debate.agents"], ["--set", "dotted.key=value"]),
        "--set into a value": Case(["--set", "seed.x=1"], ["seed"]),
        "bad task name": Case(["--set", "task.name=no-such-task", *SMALL], ["task.name", "no-such-task"]),
        "n_test=0": Case(["--set", "task.n_test=0", "--set", "finetune.iterations=0"], ["task.n_test"]),
        "bad base_url scheme": Case([*OPENAI, "--set", "endpoint.base_url=ftp://127.0.0.1/v1"],
                                    ["endpoint.base_url", "ftp://127.0.0.1/v1", "http"]),
        # Brackets in a message are printed, not read as terminal markup.
        "server list without scheme": Case(["--set", "serve.base_urls=[localhost:8000]"],
                                           ["serve.base_urls", "[localhost:8000]", "'localhost:8000'", "http"]),
        "base_url without scheme": Case([*OPENAI, "--set", "endpoint.base_url=127.0.0.1:8000/v1"],
                                        ["endpoint.base_url", "http"]),
        "missing API key": Case([*OPENAI, "--set", "endpoint.api_key_env=HARNESS_TEST_NO_SUCH_KEY",
                                 "--run-dir", "run-key"], ["HARNESS_TEST_NO_SUCH_KEY", "endpoint.api_key_env"]),
        "bad price entry": Case(["--set", "prices.gpt-4o-mini=cheap"], ["prices.gpt-4o-mini", "cheap"]),
        "run-dir is a file": Case([*SMALL, "--run-dir", "a-file"], ["a-file", "not a folder"]),
        "run-dir below a file": Case([*SMALL, "--run-dir", "a-file/run"], ["a-file", "not a folder"]),
        "resume of a non-run folder": Case(["--resume", "not-a-run"], ["not-a-run", "config.yaml"]),
        "resume of nothing": Case(["--resume", "no-such-run"], ["no-such-run", "run directory"]),
        "resume of a file": Case(["--resume", "a-file"], ["a-file", "a file"]),
        "resume with --config": Case(["--resume", str(finished_run), "--config", "demo"], ["--resume", "--config"]),
        "resume with a changed frozen setting": Case(["--resume", str(finished_run), "--set", "debate.agents=5"],
                                                     ["debate.agents", "cannot change"]),
        "unreachable server": Case([*OPENAI, "--set", f"endpoint.base_url=http://127.0.0.1:{_free_port()}/v1",
                                    "--run-dir", "run-unreachable"], ["cannot connect", "endpoint.base_url"]),
    }
    for mode, expect in {"401": ["authentication failed", "OPENAI_API_KEY"],
                         "404": ["not found", "endpoint.base_url"],
                         "html": ["endpoint.base_url", "text/html", "Sign in", "/v1"],
                         "garbage": ["endpoint.base_url", "not JSON", "application/octet-stream"],
                         "empty": ["endpoint.base_url", "not a chat completion", "{}"]}.items():
        run = tmp / f"run-{mode}"
        cases[f"{mode} server"] = Case([*OPENAI, "--set", f"endpoint.base_url={servers[mode].base_url}",
                                        "--run-dir", run.name], expect, journal=run)
    return cases


@pytest.fixture(scope="module")
def audit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-inputs")
    finished = tmp / "finished"
    first = _run(Case([*SMALL, "--run-dir", str(finished)], []), tmp)
    assert first.returncode == 0, first.stdout + first.stderr
    with contextlib.ExitStack() as stack:
        # A little latency: a run's calls are in flight together when the first error comes back.
        servers = {mode: stack.enter_context(BadEndpoint(mode, delay_s=0.05))
                   for mode in ("401", "404", "html", "garbage", "empty")}
        cases = _cases(tmp, servers, finished)
        with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
            results = dict(zip(cases, pool.map(lambda c: _run(c, tmp), cases.values())))
    return cases, results


CASE_NAMES = [
    "bad YAML", "empty YAML", "YAML not a mapping", "YAML not UTF-8", "missing config file", "nonexistent preset",
    "unknown field", "unknown section", "wrong type", "out of range", "bad --set syntax", "--set into a value",
    "bad task name", "n_test=0", "bad base_url scheme", "server list without scheme", "base_url without scheme",
    "missing API key", "bad price entry", "run-dir is a file", "run-dir below a file", "resume of a non-run folder",
    "resume of nothing", "resume of a file", "resume with --config", "resume with a changed frozen setting",
    "unreachable server", "401 server", "404 server", "html server", "garbage server", "empty server",
]


@pytest.mark.slow  # ~30 processes: seconds each on a busy machine
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_mistake_ends_in_one_clear_message(audit, name):
    cases, results = audit
    case, proc = cases[name], results[name]
    out = proc.stdout + proc.stderr
    flat = " ".join(out.split())
    assert proc.returncode != 0, out
    assert "Traceback" not in out and "Task exception" not in out, out
    for text in case.expect:
        assert text in flat, f"{text!r} not in: {flat}"
    if case.journal is not None:
        # Every request sent to the bad server was refused, and is closed as such: none is left
        # open (lost at the next start) or counted as possibly billed.
        states: dict[str, str] = {}
        for line in (case.journal / "calls-in-flight.jsonl").read_text().splitlines():
            entry = json.loads(line)
            states[entry["id"]] = entry["state"]
        assert states and set(states.values()) == {"refused"}, states


@pytest.mark.slow
def test_every_case_is_checked(audit):
    cases, _ = audit
    assert sorted(cases) == sorted(CASE_NAMES)


# ----------------------------------------------------------------------------- the machine's mistakes

def _try_mount(path: Path, *options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True)


def test_a_read_only_run_directory_says_so_and_how_to_go_on(tmp_path):
    ro = tmp_path / "ro"
    mounted = _try_mount(ro, "size=1m")
    if mounted:
        (ro / "run").mkdir()
        assert subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True).returncode == 0
    elif os.geteuid() != 0:
        (ro / "run").mkdir()
        ro.chmod(0o555)
        (ro / "run").chmod(0o555)
    else:
        pytest.skip("root without mount: no way to make a folder read-only here")
    try:
        for target in (ro / "run", ro / "new"):
            proc = _run(Case([*SMALL, "--run-dir", str(target)], []), tmp_path)
            out = " ".join((proc.stdout + proc.stderr).split())
            assert proc.returncode == 1 and "Traceback" not in out, out
            assert f"cannot write {target}" in out and "--run-dir" in out and "writable" in out, out
    finally:
        if mounted:
            _umount(ro)
        else:
            ro.chmod(0o755)


def test_a_full_disk_stops_with_one_message_and_the_run_resumes_without_loss(tmp_path):
    disk = tmp_path / "disk"
    run = disk / "run"
    args = ["--set", "task.n_test=60", "--set", "finetune.iterations=0", "--run-dir", str(run)]
    mounted = _try_mount(disk, "size=160k")
    if mounted:
        first = _run(Case(args, []), tmp_path)
    else:  # no mount here: a file-size limit makes writes fail the same way, without filling a real disk
        env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}

        def limit() -> None:
            import resource
            import signal
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

        first = subprocess.run([sys.executable, "-m", "harness.loop", *args], cwd=tmp_path, capture_output=True,
                               text=True, timeout=240, env=env, preexec_fn=limit)
    try:
        out = " ".join((first.stdout + first.stderr).split())
        assert first.returncode == 1 and "Traceback" not in out, out
        assert f"cannot write {run}" in out and f"python -m harness.loop --resume {run}" in out, out
        if mounted:
            assert "the disk is full" in out, out
            subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        again = _run(Case(["--resume", str(run)], []), tmp_path)
        assert again.returncode == 0, again.stdout + again.stderr
        records = (run / "iter-0" / "debate-test.jsonl").read_text().splitlines()
        assert len(records) == 60 and len({json.loads(r)["problem"]["id"] for r in records}) == 60
    finally:
        if mounted:
            _umount(disk)


@pytest.mark.parametrize("command", [
    ["harness.report", "RUN", "--out", "a-file/report"],
    ["harness.compare", "--comparison", "paper-table2", "--methods", "debate", "--out", "a-file/cmp",
     "--set", "task.n_test=2"],
])
def test_the_other_commands_name_a_folder_they_cannot_write(tmp_path, command):
    """harness.report and harness.compare, like the loop, end in one message (not a traceback)
    when their output folder cannot be made: here it would lie under a file."""
    (tmp_path / "a-file").write_text("not a folder\n")
    run = tmp_path / "RUN"
    run.mkdir()
    (run / "config.yaml").write_text("name: x\n")
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", *command], cwd=tmp_path, capture_output=True, text=True,
                          timeout=240, env=env)
    said = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in said, said
    assert "a-file" in said and "error:" in said, said
