"""Experiment tracking with Weights & Biases (main process only; a no-op elsewhere)."""

from pipeline.tracking.session import STEP_KEY
from pipeline.tracking.tracker import Tracker

__all__ = ["STEP_KEY", "Tracker"]
