"""A worker process: one pjsua2 Endpoint, up to ``workers.connections_per_worker``
connections and their calls, driven by the supervisor over one socket.

Imports stay lean (no HTTP, API, store, pydantic or structlog): see ``main.py``.
"""
