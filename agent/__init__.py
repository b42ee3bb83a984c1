"""uac-agent: a SIP UAC registration agent."""

__version__ = "0.1.0"
