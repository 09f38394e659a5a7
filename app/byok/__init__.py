"""Bring your own key: a user's own OpenAI key, checked with the upstream, stored encrypted, used for their calls."""
