"""Helpers for tests and CI: artefacts built offline (no downloads), such as a tiny model."""
