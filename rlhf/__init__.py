"""The root ``rlhf`` command and the end-to-end run; it composes the three packages' command groups."""

__version__ = "0.1.0"
