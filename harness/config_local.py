"""Run-config sections of open models: the vLLM server (`serve`) and local LoRA training
(`finetune.local`), each with the Ray settings of its runner.

harness.config holds them in RunConfig and re-exports them; they import only pydantic and
harness.config_base.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from harness.config_base import _http_url, _Strict
from harness.probe_settings import AdapterProbeConfig


class RayJobsConfig(_Strict):
    """`finetune.local.runner: ray`: each job is submitted to a Ray cluster through Ray's Job
    Submission API (entrypoint `python -m harness.providers.local_train --job-dir DIR`)."""

    # The cluster's dashboard (Job API) address, e.g. http://head:8265. None: Ray's own lookup
    # (RAY_API_SERVER_ADDRESS, RAY_ADDRESS, or a cluster started on this machine). Those two
    # environment variables, when set, win over this field (Ray's rule).
    address: str | None = None
    num_gpus_per_job: float = Field(1, ge=0)  # entrypoint_num_gpus: Ray sets CUDA_VISIBLE_DEVICES
    num_cpus_per_job: float = Field(1, ge=0)  # entrypoint_num_cpus
    # Ray runtime_env of every job (env_vars, py_modules, pip, ...); merged over the harness's own
    # env_vars (PYTHONPATH to this checkout, PYTHONUNBUFFERED, TOKENIZERS_PARALLELISM).
    runtime_env: dict[str, Any] = Field(default_factory=dict)
    # Refuse to submit when no node of the cluster has num_gpus/num_cpus_per_job (the job would
    # wait forever). False for an autoscaling cluster whose nodes appear on demand.
    check_resources: bool = True


class LocalFinetuneConfig(_Strict):
    """The `local` provider: TRL SFT with a PEFT LoRA adapter (or a full finetune), one
    process per job (or processes_per_job, sharded), started by a runner (a subprocess here, or
    a Ray job). Epochs and per-process batch size come from `finetune.hyperparameters`."""

    base_model_path: str | None = None  # weights to train (path or hub id); None: serve.model
    r: int = Field(8, ge=1)  # LoRA rank; must not exceed serve.max_lora_rank
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"
    # 1e-4: the usual LoRA rate (LoRA needs ~10x the full-finetuning rate); with the paper's 2
    # epochs over a few hundred examples it moves the adapter without wrecking the base model.
    # Scaled by hyperparameters.learning_rate_multiplier.
    learning_rate: float = Field(1e-4, gt=0)
    max_length: int = Field(2048, ge=16)  # tokens per example; longer ones are truncated
    full_finetune: bool = False  # train all weights; the result is a model dir, not an adapter
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: a GPU when present
    max_parallel_jobs: int = Field(1, ge=1)  # jobs training (or submitted to Ray) at once
    # CPU threads per job (torch.set_num_threads); None: torch's default, every core. On a CPU
    # shared with other work (or with max_parallel_jobs > 1), 1 avoids threads waiting on each
    # other: a SmolLM2 step took 85-120 s with 2 threads on a busy 2-core machine, 10 s with 1.
    # The resident trainer's one process gets threads x max_parallel_jobs (the jobs' cores apart).
    threads: int | None = Field(None, ge=1)
    # finetune.single_model only: "mean_agent_job" caps the pooled job at the mean optimizer steps
    # (epochs x ceil(examples / batch)) of the per-agent jobs the same data would have given, so
    # single-agent FT is compared at equal steps; "epochs": the epochs alone decide (more steps).
    single_model_steps: Literal["epochs", "mean_agent_job"] = "epochs"
    python: str | None = None  # interpreter with the `local` extra (on every Ray node); None: the running one
    # Where jobs run: "subprocess" (this machine, the default) or "ray" (a Ray cluster, see `ray`).
    runner: Literal["subprocess", "ray"] = "subprocess"
    # Where job directories live; None: <run dir>/local-jobs. With Ray on several nodes, a path on
    # storage every node mounts at the same place: jobs go to <jobs_dir>/<run>-<hash>/, training
    # files are copied there, and <run dir>/local-jobs links to it.
    jobs_dir: str | None = None
    # subprocess runner: GPUs handed out one per job through CUDA_VISIBLE_DEVICES, e.g. [0, 1, 2, 3];
    # at most len(devices) jobs run at once unless share_devices. None: the environment's as is.
    devices: list[int | str] | None = None
    share_devices: bool = False  # let more jobs than devices run, several on one GPU
    ray: RayJobsConfig = Field(default_factory=RayJobsConfig)
    # Processes one job trains with, one per GPU (torch.distributed: NCCL on GPUs, gloo on a
    # CPU): the subprocess runner gives each job this many of `devices`, the ray runner asks for
    # at least this many GPUs. 1: one plain process, as before (no launcher, no process group).
    # docs/finetuning/sharded.md
    processes_per_job: int = Field(1, ge=1)
    # How several processes split the work: "fsdp" shards weights, gradients and optimizer
    # state (FSDP2), what a full finetune of a 7B model needs; "ddp" keeps a whole model per
    # process. "auto": fsdp for a full finetune, ddp for LoRA (the frozen base fits a GPU and
    # only the small adapter's gradients travel).
    sharding: Literal["auto", "fsdp", "ddp"] = "auto"
    # Examples per optimizer step over all processes; the per-process batch is
    # finetune.hyperparameters.batch_size, and gradient accumulation makes up the rest:
    # effective = batch_size x processes_per_job x accumulation. None: no accumulation.
    effective_batch_size: int | None = Field(None, ge=1)
    lr_scheduler: Literal["linear", "cosine", "constant"] = "linear"  # decay after the warmup
    warmup_ratio: float = Field(0.0, ge=0, lt=1)  # share of the steps with a rising learning rate
    # bfloat16 compute (a sharded full finetune keeps float32 weights). None: where the GPU has it.
    bf16: bool | None = None
    seed: int | None = None  # data order, dropout, a new adapter's weights; None: the run's `seed`
    # A job saves a checkpoint under <job dir>/checkpoints every checkpoint_steps optimizer steps
    # and whenever checkpoint_minutes passed since the last one; a job started again in its
    # folder resumes from the newest complete one. None turns either trigger off. Ten minutes:
    # short jobs (LoRA on a small model) never pay for a save, long ones lose at most that.
    checkpoint_steps: int | None = Field(None, ge=1)
    checkpoint_minutes: float | None = Field(10.0, gt=0)  # see checkpoint_steps
    # How an iteration's LoRA jobs run: "resident": the jobs submitted together on one base model
    # train in ONE process that loads the model once, taking turns one step each
    # (harness.providers.resident_train; same losses as separate jobs, docs/finetuning/resident.md);
    # "per_job": one process per job; "auto": resident when every job runs on one device
    # (subprocess runner, at most one GPU in `devices`) and LoRA, per_job otherwise.
    trainer: Literal["auto", "resident", "per_job"] = "auto"

    @property
    def resident(self) -> bool:
        """Whether jobs submitted together share one resident process (`trainer` resolved)."""
        return self.resident_with(len(self.devices or []))

    def resident_with(self, gpus: int) -> bool:
        """The same on a machine of `gpus` GPUs (0 or 1: one device; auto is resident there)."""
        if self.trainer == "auto":
            return self.runner == "subprocess" and not self.full_finetune and gpus <= 1
        return self.trainer == "resident"

    @model_validator(mode="after")
    def _check_trainer(self) -> "LocalFinetuneConfig":
        if self.trainer == "resident" and self.runner != "subprocess":
            raise ValueError("trainer: resident runs its one process on this machine (runner: subprocess); with "
                             "runner: ray use trainer: per_job (or auto)")
        if self.trainer == "resident" and self.full_finetune:
            raise ValueError("trainer: resident trains LoRA adapters on one shared base model; a full finetune "
                             "trains whole models: use trainer: per_job (or auto)")
        return self

    @model_validator(mode="after")
    def _check_devices(self) -> "LocalFinetuneConfig":
        if self.devices is not None and not self.devices:
            raise ValueError("devices: an empty list leaves no GPU for any job; list GPUs (e.g. [0, 1]) or omit it")
        if self.devices is not None and len({str(d) for d in self.devices}) != len(self.devices):
            raise ValueError(f"devices: {self.devices} lists a GPU twice; list each once (share_devices: true "
                             f"lets jobs share them)")
        return self

    @model_validator(mode="after")
    def _check_processes(self) -> "LocalFinetuneConfig":
        n = self.processes_per_job
        if self.devices is not None and len(self.devices) < n:
            raise ValueError(f"devices: {len(self.devices)} GPU(s) listed ({self.devices}) but processes_per_job "
                             f"is {n}, one GPU per process; list at least {n} or lower processes_per_job")
        if self.sharding == "fsdp" and not self.full_finetune:
            raise ValueError("sharding: fsdp shards a full finetune; a LoRA job (full_finetune: false) runs with "
                             "ddp (or auto)")
        return self

    def accumulation_error(self, batch_size: int) -> str | None:
        """Why effective_batch_size cannot be reached from this per-process batch, or None."""
        per_step = batch_size * self.processes_per_job
        if self.effective_batch_size is not None and self.effective_batch_size % per_step:
            return (f"finetune.local.effective_batch_size: {self.effective_batch_size} is not a multiple of "
                    f"finetune.hyperparameters.batch_size ({batch_size}) x finetune.local.processes_per_job "
                    f"({self.processes_per_job}) = {per_step}; pick an effective batch that is, or change those two")
        return None

    def accumulation_steps(self, batch_size: int) -> int:
        """Gradient accumulation steps that reach effective_batch_size (1 without one)."""
        if self.effective_batch_size is None:
            return 1
        return max(1, self.effective_batch_size // (batch_size * self.processes_per_job))

    def ray_gpus(self) -> float:
        """GPUs the ray runner asks for per job: one per process (0 stays 0: a CPU cluster)."""
        gpus = self.ray.num_gpus_per_job
        return max(gpus, self.processes_per_job) if gpus > 0 and self.processes_per_job > 1 else gpus


class RayServeConfig(_Strict):
    """`serve.runner: ray`: each vLLM server is a Ray job (Job Submission API) on the cluster."""

    address: str | None = None  # the dashboard address, as finetune.local.ray.address
    # GPUs reserved per server; None: tensor_parallel_size x data_parallel_size. 0 when vLLM
    # places its own workers on the cluster (--distributed-executor-backend ray, multi-node).
    num_gpus_per_server: float | None = Field(None, ge=0)
    num_cpus_per_server: float = Field(1, ge=0)
    runtime_env: dict[str, Any] = Field(default_factory=dict)  # merged over the server's env_vars
    # The interface each server listens on: all of its node's, so the loop can reach it. A server
    # is reached at http://<its node's IP>:<port>/v1.
    bind_host: str = "0.0.0.0"
    check_resources: bool = True


class ServeConfig(_Strict):
    """The vLLM server for open models: started by the loop (`manage: true`) or attached to
    (endpoint.base_url, or several servers in `base_urls`)."""

    model: str | None = None  # base model path or hub id the server loads
    served_name: str = "base"  # the name debates use for the base model (models.base)
    manage: bool = False  # start and stop the server ourselves
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    max_lora_rank: int = 8  # vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320, 512
    max_loras: int | None = Field(None, ge=1)  # adapters in one batch; None: 2 x debate.agents
    max_model_len: int | None = Field(None, ge=16)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)  # on CPU builds: share of RAM
    tensor_parallel_size: int = Field(1, ge=1)  # GPUs per model replica
    data_parallel_size: int = Field(1, ge=1)  # model replicas behind one server
    extra_args: list[str] = Field(default_factory=list)  # passed to vLLM as is
    env: dict[str, str] = Field(default_factory=dict)  # extra environment for the server
    python: str | None = None  # interpreter with vLLM; None: .venv-vllm/bin/python if present
    startup_timeout_s: float = Field(900.0, gt=0)
    # Several servers (e.g. one per GPU): agents are spread across them; adapters load on all.
    base_urls: list[str] = Field(default_factory=list)
    # manage: true only. Servers the loop starts: replica i listens on port + i. With the
    # subprocess runner, replica i gets GPUs devices[i*g:(i+1)*g] (g = tensor x data parallel
    # size) through CUDA_VISIBLE_DEVICES; with the ray runner each is a Ray job on the cluster.
    replicas: int = Field(1, ge=1)
    devices: list[int | str] | None = None  # subprocess runner: GPUs for the replicas; None: as is
    runner: Literal["subprocess", "ray"] = "subprocess"
    ray: RayServeConfig = Field(default_factory=RayServeConfig)
    # After each load of LoRA adapters: check on every server that each one changes the base
    # model's log-probabilities (stops the run when one does not); see harness/probe_settings.py.
    probe: AdapterProbeConfig = Field(default_factory=AdapterProbeConfig)

    _check_base_urls = field_validator("base_urls")(lambda cls, v: [_http_url(u) for u in v])

    @model_validator(mode="after")
    def _check_rank(self) -> "ServeConfig":
        if self.max_lora_rank not in (1, 8, 16, 32, 64, 128, 256, 320, 512):
            raise ValueError("max_lora_rank: vLLM accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512")
        return self

    @model_validator(mode="after")
    def _check_replicas(self) -> "ServeConfig":
        if self.port + self.replicas - 1 > 65535:
            raise ValueError(f"replicas: {self.replicas} servers from port {self.port} run past port 65535")
        if self.devices is not None:
            need = self.replicas * self.tensor_parallel_size * self.data_parallel_size
            if len(self.devices) < need:
                raise ValueError(f"devices: {self.replicas} replica(s) x {self.tensor_parallel_size * self.data_parallel_size} "
                                 f"GPU(s) each need {need} devices, {len(self.devices)} listed ({self.devices})")
        return self

