"""Tuning on the validation split: an Optuna study whose trials are ordinary training runs (launch/tune.py)."""

# Optuna's own variable for a storage URL (its CLI reads it): launch/tune.py's --storage defaults to it, and a
# Kubernetes tuner gets it from a Secret, so that a database password is in no command line.
STORAGE_VAR = "OPTUNA_STORAGE"


def final_seeds(text: str) -> tuple[int, ...]:
    """--final-seeds as launch/tune.py and submit.py --tune read it: seeds separated by commas, '' for none."""
    from pipeline.errors import ConfigError

    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        seeds = (-1,)
    if any(s < 0 for s in seeds):
        raise ConfigError(f"--final-seeds {text!r} must be seeds (integers of 0 or more) separated by commas, e.g. "
                          "0,1,2, or '' for none")
    return seeds
