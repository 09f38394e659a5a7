"""Threads in the Assistants API's terms: messages, runs answered through the upstream, profiles, context, retention."""
