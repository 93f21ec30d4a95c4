"""sdfarm: the contract shared by the producer and the workers (no torch here)."""

__version__ = "0.1.0"
