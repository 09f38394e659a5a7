"""Operator routes under /admin, guarded by ADMIN_API_KEY."""
