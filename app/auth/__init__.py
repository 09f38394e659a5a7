"""Who is calling: gateway API keys, JWTs and the admin key, resolved to one principal."""
