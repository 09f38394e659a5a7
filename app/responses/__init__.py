"""The Responses API (`/v1/responses`), through the one call pipeline, each response owned by its creator."""
