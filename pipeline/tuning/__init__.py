"""Tuning on the validation split: an Optuna study whose trials are ordinary training runs (launch/tune.py)."""

# Optuna's own variable for a storage URL (its CLI reads it): launch/tune.py's --storage defaults to it, and a
# Kubernetes tuner gets it from a Secret, so that a database password is in no command line.
STORAGE_VAR = "OPTUNA_STORAGE"
