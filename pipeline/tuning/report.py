"""What a study leaves: the winner as a config train.py runs as is, the trials table, and the plots.

The winner is the completed trial with the highest validation accuracy; a tie (a small validation split
that several good settings get right) goes to the lower validation loss. Optuna's own best_trial would
break the tie by trial number.
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import load_config, save_config
from pipeline.errors import ConfigError
from pipeline.files import write_text_atomic
from pipeline.training.outputs import write_json_atomic
from pipeline.tuning.space import SearchSpace


def winner(study: optuna.Study) -> FrozenTrial:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        raise ConfigError(f"study {study.study_name} has no completed trial yet: nothing to choose from. Run more "
                          "trials (the failed ones say why in the study's trials.csv)")
    return max(done, key=rank)


def rank(trial: FrozenTrial) -> tuple:
    """How complete trials are ordered: validation accuracy, ties to the lower validation loss, then the first."""
    return trial.value, -trial.user_attrs.get("val_loss", float("inf")), -trial.number


def write_best(study: optuna.Study, space: SearchSpace, config: str, overrides: list[str], study_dir: Path) -> Path:
    """STUDY/best.yaml: the user's config with their overrides and the winner's values, scored on test when run."""
    best = winner(study)
    cfg = load_config(config, [*overrides, *space.overrides(best.params), f"output_dir={study_dir / 'best'}"])
    path = study_dir / "best.yaml"
    save_config(cfg, path)  # whole or not at all: a final run never reads half of it
    return path


def _origin(t: FrozenTrial) -> str:
    """Where a trial's values came from; studies begun before starting points marked the baseline alone."""
    return t.user_attrs.get("origin") or ("the config as given" if t.user_attrs.get("baseline") else "drawn")


def _row(t: FrozenTrial) -> dict[str, Any]:
    state = "interrupted" if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") else t.state.name.lower()
    return {"number": t.number, "state": state, "origin": _origin(t), "val_accuracy": t.value,
            "val_loss": t.user_attrs.get("val_loss"), "steps": t.user_attrs.get("steps"),
            "reports": len(t.intermediate_values), "seconds": t.user_attrs.get("seconds"),
            **{f"param:{k}": v for k, v in t.params.items()}, "error": t.user_attrs.get("error") or ""}


def write_trials(study: optuna.Study, path: Path) -> list[dict[str, Any]]:
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=keys)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())
    return rows


def write_plots(study: optuna.Study, out: Path) -> list[Path]:
    """The optimisation history and, with enough finished trials, the parameters' importances."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    written = []
    plots = [("optimization_history", oplt.plot_optimization_history)]
    if len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= 2 and study.best_trial.params:
        plots.append(("param_importances", oplt.plot_param_importances))
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "experimental" and "importances equal": the plot says as much
            try:
                ax = plot(study)
            except (ValueError, RuntimeError):  # importances of parameters that never varied: no plot to draw
                continue
        fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out / f"{name}.png")
    return written


def summary(study: optuna.Study, rows: list[dict[str, Any]]) -> dict[str, Any]:
    states = [r["state"] for r in rows]
    best = winner(study)
    return {"study": study.study_name, "trials": len(rows), "complete": states.count("complete"),
            "pruned": states.count("pruned"), "failed": states.count("fail"), "interrupted": states.count("interrupted"),
            "best": {"number": best.number, "val_accuracy": best.value, "val_loss": best.user_attrs.get("val_loss"),
                     "params": best.params}}


def write_report(study: optuna.Study, space: SearchSpace, config: str, overrides: list[str], study_dir: Path) -> dict:
    rows = write_trials(study, study_dir / "trials.csv")
    best_yaml = write_best(study, space, config, overrides, study_dir)
    plots = write_plots(study, study_dir)
    result = {**summary(study, rows), "best_config": str(best_yaml), "plots": [str(p) for p in plots]}
    write_json_atomic(study_dir / "study.json", json.loads(json.dumps(result, default=str)))
    return result
