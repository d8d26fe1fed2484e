"""Tenants as an admin configures them: fair-share weight, priority cap and quotas."""
