"""The one place that talks to the upstream: HTTP pass-through, the SDK client, the simulated provider."""
