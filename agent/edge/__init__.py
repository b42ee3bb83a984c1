"""The SIP edge the supervisor runs beside its workers: Kamailio, rtpengine, HAProxy (docs/edge.md)."""
