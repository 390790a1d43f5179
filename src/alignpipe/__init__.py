"""alignpipe: staged RLHF / preference-alignment pipeline."""

__version__ = "0.1.0"
