"""Robota Remote client: use models held by a Robota proxy as if they were local."""
