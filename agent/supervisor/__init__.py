"""The supervisor: the process ``uac-agent run`` starts.

It owns the config, the store, reload, the HTTP surface (status, API, metrics,
health) and the signals, and runs the connections on worker processes
(``agent/worker``) through :class:`~agent.supervisor.pool.WorkerPool`. It never
imports pjsua2.
"""
