"""The auth tests' fixtures: a database of its own, keys of tenants acme and bravo and an
admin, and an API client."""

from tests.app.auth.test_auth import client, keys  # noqa: F401
