"""testbed: hardware-in-the-loop orchestrator for transactive energy."""

__version__ = "0.1.0"
