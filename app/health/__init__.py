"""Liveness, readiness and the model list."""
