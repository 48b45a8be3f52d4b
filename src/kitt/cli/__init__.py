"""The ``kitt`` and ``kitt-agent`` command lines (click)."""
