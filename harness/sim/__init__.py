"""The simulator: an OpenAI-compatible HTTP server with simulated models (a test double).

It serves chat completions, models, embeddings, files, fine-tuning jobs and vLLM's adapter
endpoints on 127.0.0.1, for tests, benchmarks and the offline default run. Every response
carries `x-simulated: true`; completions carry `system_fingerprint: "simulated"`. Numbers it
produces describe the simulator's rules, not any real model.

    with SimServer(SimulatorConfig(seed=1)) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="x")

The rules: models.py (how simulated models answer), training.py (how finetuning changes them),
faults.py (latency, 429, 500, hangs), store.py (job timing and persistence).
"""

from harness.sim.app import create_app
from harness.sim.models import ModelParams
from harness.sim.server import SimServer

__all__ = ["create_app", "SimServer", "ModelParams"]
