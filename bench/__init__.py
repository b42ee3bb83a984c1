"""Benchmarks of uac-agent against real peers on loopback (``python -m bench.<name>``)."""
