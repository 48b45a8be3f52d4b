"""KITT: benchmark LLM inference across a fleet of GPU machines."""

__version__ = "0.1.0"
