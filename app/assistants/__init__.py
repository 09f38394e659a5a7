"""Assistants (the Assistants API v2): a user's own and the shared ones."""
