"""The `hardware` section of the run config: the GPUs `--dry-run`'s "GPU estimate" plans for.

Nothing else reads it: where servers and jobs actually run is `serve.devices` and
`finetune.local.devices` (or Ray). It is a config section rather than dry-run flags so a lab
writes its machine once in its YAML next to the run it plans, and `--set hardware.gpus=8`
works as for any field. Imports only pydantic (harness.config imports this module).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class HardwareSettings(BaseModel):
    """The GPUs of the `--dry-run` GPU estimate (harness/scaling.py prints the formulas and sources)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # GPUs available to the run; None: the number listed in finetune.local.devices or
    # serve.devices (the larger), else 1.
    gpus: int | None = Field(None, ge=1)
    gpu_memory_gb: float = Field(80.0, gt=0)  # memory of each GPU
    # The GPU kind sets its peak bf16 throughput (dense tensor-core TFLOPS from NVIDIA's data sheets).
    gpu: Literal["h100", "h200", "a100"] = "h100"
    # Share of the GPU's peak that training achieves (activation recomputation counted as work);
    # None: 0.40, from the published MFU figures harness/scaling.py cites.
    mfu: float | None = Field(None, gt=0, le=1)
