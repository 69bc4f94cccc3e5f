"""Checkpoints on disk: the format and its integrity, and what may change under a resume."""
