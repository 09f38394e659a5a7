"""OpenAI-compatible chat completions, plain and streamed."""
