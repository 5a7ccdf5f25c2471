"""State behind small interfaces: SQL (SQLite or PostgreSQL) for keys, users, counters and
the ledger; memory or Redis for rate limits and the cache."""
