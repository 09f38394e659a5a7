"""Conversation threads: assistant profiles, turns answered through the upstream, context, retention."""
