"""Distributed training pipeline for recurrent sequence classifiers on the MNIST family."""

__version__ = "0.1.0"
