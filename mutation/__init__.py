"""Mutation testing of the money and security modules (``nox -s mutation``, issue 14)."""
