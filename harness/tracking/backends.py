"""The backend a run's `tracking.backend` names: the one place that chooses, importing only the
chosen tracker's module (its package may take seconds to import, or be missing)."""

from __future__ import annotations

import importlib.util

from harness.errors import ConfigError
from harness.tracking.base import Backend
from harness.tracking.settings import PACKAGES, TrackingConfig


def require(backend: str) -> None:
    """A clear error before anything runs when the chosen backend's package is missing."""
    module = {"trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}[backend]
    try:
        # Looked up, not imported: importing MLflow or W&B takes seconds the run need not wait for
        # (the tracker's thread imports it); an install that is found but broken is a warning then.
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}")
    except ImportError as e:
        # Said without the extra's brackets, which a rich console would take for markup.
        raise ConfigError(f"tracking.backend is {backend!r} but {module} cannot be imported ({e}); install the "
                          f"harness's {backend!r} extra: pip install {PACKAGES[backend]} "
                          f"(or run without a tracker: --set tracking.backend=none)") from None


def make_backend(settings: TrackingConfig) -> Backend:
    require(settings.backend)
    if settings.backend == "mlflow":
        from harness.tracking.mlflow_backend import MlflowBackend

        return MlflowBackend(settings)
    if settings.backend == "wandb":
        from harness.tracking.wandb_backend import WandbBackend

        return WandbBackend(settings)
    from harness.tracking.trackio_backend import TrackioBackend

    return TrackioBackend(settings)
