"""hamta: a high-availability active-passive MTA. This package is the relay."""

__version__ = "0.1.0"
