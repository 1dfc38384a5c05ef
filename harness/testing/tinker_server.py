"""A real Tinker-API server on 127.0.0.1 for tests and local experiments: SkyRL's `skyrl-tx`
(JAX on CPU) in its own environment (.venv-tinker, built by .ci/setup-tinker.sh).

    with tinker_server(model_dir, work_dir) as server:
        server.base_url, server.base_model   # what finetune.tinker.base_url / base_model take

The server trains LoRA adapters on the one base model it was started with. Its transformers
(4.x, pinned by skyrl-tx) cannot read the folder `harness.models smollm2` writes (transformers 5),
so `compatible_model_copy` makes a copy with two edits instead of touching the cache:
`tokenizer_config.json` names `PreTrainedTokenizerFast`, and `config.json` gets `rope_theta` at
the top level (transformers 5 keeps it under `rope_parameters`). The weights are linked, not copied.

Run by hand: `python -m harness.testing.tinker_server MODEL_DIR WORK_DIR` (stops on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-tinker"


def tinker_python() -> Path | None:
    """The interpreter of .venv-tinker, or None when the environment has not been built."""
    python = VENV / "bin" / "python"
    return python if python.exists() and (VENV / "bin" / "uv").exists() else None


def compatible_model_copy(model_dir: Path, out_dir: Path) -> Path:
    """`out_dir`: the model folder in the form skyrl-tx's transformers 4.x reads (see above)."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if (out_dir / "config.json").exists():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name in ("config.json", "tokenizer_config.json"):
            continue
        target = tmp / item.name
        try:
            os.link(item, target)  # the 270 MB of weights are not duplicated
        except OSError:
            shutil.copy2(item, target)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tok = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok["tokenizer_class"] = "PreTrainedTokenizerFast"
    if "chat_template" not in tok and (model_dir / "chat_template.jinja").exists():
        tok["chat_template"] = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    (tmp / "tokenizer_config.json").write_text(json.dumps(tok, indent=2), encoding="utf-8")
    os.replace(tmp, out_dir)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class TinkerServer:
    base_url: str  # http://127.0.0.1:PORT (the SDK adds /api/v1)
    base_model: str  # the model name the server serves (its --base-model: the folder's path)
    pid: int
    log: Path


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (the API server and its engine), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        if proc.poll() is not None:
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def tinker_server(model_dir: Path, work_dir: Path, *, startup_timeout_s: float = 300.0,
                  max_lora_adapters: int = 8) -> Iterator[TinkerServer]:
    """Start the server on a free port of 127.0.0.1 with the model at `model_dir` (a compatible
    copy is made under `work_dir`), wait for its health check, yield it, stop it by its pid."""
    python = tinker_python()
    if python is None:
        raise RuntimeError(f"{VENV} is missing or incomplete; build it with: bash .ci/setup-tinker.sh")
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    model = compatible_model_copy(model_dir, work_dir / "model")
    port = free_port()
    log = work_dir / "server.log"
    (work_dir / "checkpoints").mkdir(exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": f"{python.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # the server is skyrl-tx's own program, not the harness
    cmd = [str(python), "-m", "tx.tinker.api", "--base-model", str(model),
           "--checkpoints-base", str(work_dir / "checkpoints"),
           "--database-url", f"sqlite:///{work_dir / 'tinker.db'}",
           "--backend-config", json.dumps({"max_lora_adapters": max_lora_adapters, "max_lora_rank": 8,
                                                  # one sequence per compiled program: batches of any size reuse it
                                                  "train_micro_batch_size": 1}),
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
                raise RuntimeError(f"the Tinker server did not start (exit code {proc.poll()}); {log}:\n{tail}")
            time.sleep(0.5)
        yield TinkerServer(base_url=url, base_model=str(model), pid=proc.pid, log=log)
    finally:
        _stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run a local Tinker-API server (skyrl-tx) until Ctrl-C.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    args = parser.parse_args(argv)
    # `kill PID` stops it as Ctrl-C does (a background job of a script ignores SIGINT).
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    with tinker_server(args.model_dir, args.work_dir) as server:
        print(f"base_url {server.base_url}\nbase_model {server.base_model}\npid {server.pid}\nlog {server.log}",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
