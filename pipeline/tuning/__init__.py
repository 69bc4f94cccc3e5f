"""Tuning on the validation split: an Optuna study whose trials are ordinary training runs (launch/tune.py)."""
