"""The UAC Connections API (seeds 000, 001, 004): create, list, retrieve, update,
delete and act on connections at runtime, persisted in SQLite."""
