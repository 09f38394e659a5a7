"""Image generation with stored results, signed URLs, history, batches and idempotency."""
