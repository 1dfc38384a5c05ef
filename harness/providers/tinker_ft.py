"""The `tinker` finetuning provider: LoRA adapters trained through the Tinker training API
(Thinking Machines' hosted service, or a self-hosted server such as SkyRL's skyrl-tx), served
to the debates by the harness's vLLM path.

Tinker has no "create a finetuning job" call: training is a client-side loop. So each of the 2N
models is a job of this provider, `python -m harness.providers.tinker_train --job-dir DIR` in a
process of its own (an environment with the `tinker` SDK: finetune.tinker.python), with the same
job directories, statuses and runner as the local provider (harness/providers/local.py), under
<run dir>/tinker-jobs/. Jobs outlive the loop, a resumed loop adopts them by their metadata, and a
job whose process died is restarted in its own directory from its last training checkpoint
(DIR/tinker.json), never as a second training. All adapters are LoRAs of one base model on the
service; at iteration >= 2 (start_from: previous) a job starts from the final state of the
agent's previous job.

Sampling: each finished job downloads its sampler weights' archive (a PEFT adapter) to DIR/adapter;
`artifacts()` hands those to the loop, which loads them into vLLM (endpoint.kind: vllm) under the
job's model id. A skyrl-tx 0.3.0 server has no OpenAI-compatible route, so this is the path that
runs against it; the hosted service's archives have the same form.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx2

from harness.config import LocalFinetuneConfig, RunConfig
from harness.errors import ConfigError, FinetuneError
from harness.fileio import write_model
from harness.providers.base import FinetuneRequest, JobState, JobStatus
from harness.providers.local import LocalProvider, adapter_name
from harness.providers.local_train import JobFile, LoraSpec, read_status, write_status
from harness.providers.runners import LAUNCH
from harness.providers.runners.subprocesses import SubprocessRunner
from harness.providers.tinker_settings import TinkerSettings, tinker_config_error
from harness.providers.tinker_train import TinkerJobSpec, read_state

JOBS_DIR = "tinker-jobs"
ROOT = Path(__file__).resolve().parents[2]


def default_python(settings: TinkerSettings) -> str:
    if settings.python:
        return settings.python
    venv = ROOT / ".venv-tinker" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class TinkerProvider(LocalProvider):
    name = "tinker"

    def __init__(self, run_dir: Path, settings: TinkerSettings, *, base_names: set[str], max_lora_rank: int | None,
                 seed: int = 0, tokenizer: str | None = None, api_key: str | None = None):
        if not settings.base_model:
            raise ConfigError("finetune.tinker.base_model is not set: name the base model as the Tinker service "
                              "knows it, e.g. --set finetune.tinker.base_model=Qwen/Qwen3-8B")
        python = default_python(settings)
        runner_cfg = LocalFinetuneConfig(max_parallel_jobs=settings.max_parallel_jobs, python=python, r=settings.rank)
        runner = SubprocessRunner(runner_cfg, python, module="harness.providers.tinker_train")
        super().__init__(run_dir, runner_cfg, base_model_path=settings.base_model, max_lora_rank=max_lora_rank,
                         base_names=base_names, seed=seed, runner=runner)
        self.link = self.jobs_dir = self.run_dir / JOBS_DIR
        self.settings = settings
        self.tokenizer = tokenizer or settings.tokenizer or settings.base_model
        self.api_key = api_key
        self._checked = False

    @classmethod
    def from_config(cls, cfg: RunConfig, run_dir: Path) -> "TinkerProvider":
        tk = cfg.finetune.tinker
        problem = tinker_config_error(cfg)
        if problem:
            raise ConfigError(problem)
        return cls(run_dir, tk, base_names={cfg.models.base, cfg.serve.served_name, tk.base_model or ""},
                   max_lora_rank=cfg.serve.max_lora_rank, seed=cfg.seed, api_key=os.environ.get(tk.api_key_env))

    # ------------------------------------------------------------------ the interface

    async def submit(self, request: FinetuneRequest) -> JobState:
        existing = await self.find(request.metadata)
        if existing is not None and existing.status is JobStatus.FAILED and self._restartable(existing.job_id):
            return await self._restart(existing.job_id)
        if existing is not None and existing.status not in (JobStatus.FAILED, JobStatus.CANCELLED):
            return existing
        await self._check_service()
        init_state = self._start_state(request.base_model)
        name, job_id, job_dir = self._new_job_dir(request.metadata)
        hp, tk = request.hyperparameters, self.settings
        spec = TinkerJobSpec(
            job_id=job_id, adapter_name=name, metadata=request.metadata,
            training_file=str(Path(request.training_file).resolve()), base_model_path=tk.base_model or "",
            lora=LoraSpec(r=tk.rank), learning_rate=tk.learning_rate * hp.learning_rate_multiplier,
            epochs=hp.n_epochs, batch_size=hp.batch_size, max_length=tk.max_length,
            seed=request.seed if request.seed is not None else self.seed, max_lora_rank=self.max_lora_rank,
            base_url=tk.base_url, api_key_env=tk.api_key_env, service_model=tk.base_model or "",
            tokenizer=self.tokenizer, init_state=init_state, checkpoint_every=tk.checkpoint_every, pad_to=tk.pad_to,
            request_timeout_s=tk.request_timeout_s)
        write_status(job_dir, JobFile(status="queued"))
        write_model(job_dir / "spec.json", spec)  # last: a directory without it is an interrupted submit
        return await self.refresh(job_id)

    async def events(self, job_id: str, limit: int = 20) -> list[str]:
        lines = await super().events(job_id, limit=10_000)
        progress = self._job_dir(job_id) / "progress.jsonl"
        extra = {}
        if progress.exists():  # the weighted-token count of each step, next to its loss
            for line in progress.read_text(encoding="utf-8").splitlines():
                try:
                    p = json.loads(line)
                    extra[p["step"]] = f" ({p['weighted_tokens']} weighted tokens of {p['tokens']})"
                except (ValueError, KeyError):
                    continue
        out = []
        for line in lines:
            step = line.split(":")[0].removeprefix("step ")
            out.append(line + extra.get(int(step), "") if step.isdigit() else line)
        return out[-limit:]

    # ------------------------------------------------------------------ internals

    def _restartable(self, job_id: str) -> bool:
        """A failed job that saved a training checkpoint is restarted from it (a killed process,
        a quota hit), not trained again from the start."""
        state = read_state(self.jobs_dir / job_id)
        return state.checkpoint is not None and state.final_state is None

    async def _restart(self, job_id: str) -> JobState:
        job_dir = self.jobs_dir / job_id
        async with self._lock:
            status = read_status(job_dir)
            status.status, status.finished_at, status.error, status.pid = "queued", None, None, None
            (job_dir / LAUNCH).unlink(missing_ok=True)
            write_status(job_dir, status)
        return await self.refresh(job_id)

    def _start_state(self, base_model: str) -> str | None:
        """The tinker path a job starts from: None for the base model, else the final state of
        the succeeded job whose model id `base_model` is (start_from: previous)."""
        if base_model in self.base_names:
            return None
        found = self._succeeded().get(base_model)
        if found is not None:
            spec, _ = found
            state = read_state(self.jobs_dir / spec.job_id)
            if state.final_state:
                return state.final_state
        if base_model.startswith("tinker://"):
            return base_model
        raise FinetuneError(f"base_model {base_model!r} is neither the base model ({', '.join(sorted(self.base_names))}) "
                            f"nor an adapter this run trained with Tinker (none succeeded under that name in "
                            f"{self.jobs_dir}) nor a tinker:// state path")

    async def _check_service(self) -> None:
        """Before the first job: the service answers and serves the base model. The hosted
        service is asked through the SDK by each job (its address is the SDK's); a server named
        by base_url is checked here, so an unreachable one fails before any job is written."""
        if self._checked or not self.settings.base_url:
            return
        url = self.settings.base_url
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        try:
            async with httpx2.AsyncClient(timeout=30) as client:
                resp = await client.get(f"{url}/api/v1/get_server_capabilities", headers=headers)
        except httpx2.HTTPError as e:
            raise FinetuneError(f"cannot reach the Tinker service at {url} ({type(e).__name__}: {e}); start it or fix "
                                f"finetune.tinker.base_url") from None
        if resp.status_code in (401, 403):
            raise FinetuneError(f"the Tinker service at {url} refused the API key (HTTP {resp.status_code}); export a "
                                f"valid key in {self.settings.api_key_env}")
        if resp.status_code != 200:
            raise FinetuneError(f"the Tinker service at {url} answered HTTP {resp.status_code} to "
                                f"get_server_capabilities: {resp.text[:300]}")
        models = [m.get("model_name") for m in resp.json().get("supported_models", [])]
        if self.settings.base_model not in models:
            raise FinetuneError(f"the Tinker service at {url} does not train {self.settings.base_model!r} "
                                f"(finetune.tinker.base_model); it serves: {', '.join(map(str, models)) or 'nothing'}")
        self._checked = True
