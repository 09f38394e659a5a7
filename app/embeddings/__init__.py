"""Embeddings (`POST /v1/embeddings`), through the one call pipeline."""
