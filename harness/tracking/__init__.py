"""Experiment tracking: the run's metrics, loss curves, config and report sent to a tracker
(trackio, MLflow, Weights & Biases), as `tracking.backend` chooses.

settings.py holds the config section; tracker.py is what the loop calls; one module per backend
behind base.Backend, each imported only when chosen (they are optional extras). Nothing here is
imported by harness.config except the settings, so the backends stay out of every other path.
"""
