"""Per-user limits, quotas and budgets, kept in Postgres so every replica sees one count."""
