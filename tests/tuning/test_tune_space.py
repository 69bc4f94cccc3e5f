"""The search space (pipeline/tuning/space.py): what it draws becomes overrides train.py reads back as they
were, and a space that names no config key or a value the config refuses exits 2 naming the key."""

from __future__ import annotations

import optuna
import pytest
from conftest import ROOT, run_py

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.tuning.space import load_space, override

CONFIG = str(ROOT / "configs" / "sequences.yaml")


def _space(tmp_path, text: str):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_shipped_space_loads_and_each_draw_is_a_valid_config():
    space = load_space(ROOT / "configs" / "search" / "sequences.yaml", CONFIG, [])
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = space.suggest(study.ask())
        cfg = load_config(CONFIG, space.overrides(values))
        for key, value in values.items():
            section, _, name = key.rpartition(".")
            got = getattr(getattr(cfg, section.split(".")[0]), name)
            assert got == value or (isinstance(got, tuple) and list(got) == value), (key, got, value)


@pytest.mark.parametrize("value", [None, True, False, "auto", "none", 1, 0.5, 1e-4, "1", "on"])
def test_an_override_reads_back_as_the_value_it_was(value):
    from pipeline.config import _parse_override

    assert _parse_override(override("a.b", value))[1] == value


@pytest.mark.parametrize("text, needles", [
    ("optim.lrate: {type: float, low: 0.001, high: 0.01}", ["optim.lrate", "not a config key"]),
    ("optim: {type: float, low: 0.001, high: 0.01}", ["'optim'", "not a config key"]),
    ("model.dropout: {type: float, low: 0.1, high: 1.5}", ["model.dropout", "refused by the config"]),
    ("optim.lr: {type: float, low: 0.0, high: 0.01, log: true}", ["optim.lr", "log scale needs low > 0"]),
    ("optim.lr: {type: float, low: 0.01, high: 0.001}", ["optim.lr", "must be below high"]),
    ("model.frontend: {type: categorical, choices: [conv, conv]}", ["model.frontend", "distinct"]),
    ("model.frontend: {type: categorical, choices: [conv, lstm]}", ["model.frontend", "'lstm'", "refused"]),
    ("optim.lr: {type: uniform, low: 0.001, high: 0.01}", ["optim.lr", "type: float|int"]),
    ("optim.lr: {type: float, low: 0.001}", ["optim.lr", "high"]),
    ("- optim.lr", ["must map config keys to distributions"]),
])
def test_a_bad_space_is_refused_naming_the_key(tmp_path, text, needles):
    path = _space(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as err:
        load_space(path, CONFIG, [])
    message = str(err.value)
    assert str(path) in message
    for needle in needles:
        assert needle in message, message


def test_the_tuner_refuses_a_bad_space_before_any_trial(tmp_path):
    """As a user meets it: exit 2, one paragraph, nothing made in the study directory."""
    space = _space(tmp_path, "model.hidden_sise: {type: int, low: 16, high: 64}\n")
    study = tmp_path / "study"
    proc = run_py("launch/tune.py", "--config", CONFIG, "data.dir=anything", "--space", str(space), "--trials", "2",
                  "--dir", str(study))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "model.hidden_sise" in proc.stderr
    assert not study.exists()


@pytest.mark.parametrize("args, needle", [
    (["--trials", "0"], "--trials (0)"),
    (["--trials", "2", "--workers", "0"], "--workers (0)"),
    (["--trials", "2", "--final-seeds", "0,x"], "--final-seeds"),
    (["--trials", "2", "--folds", "0"], "--folds (0)"),
    (["--trials", "2", "--study", "a b"], "a study's name"),
])
def test_bad_flags_are_refused(tmp_path, args, needle):
    proc = run_py("launch/tune.py", "--config", CONFIG, "data.dir=anything", "--space",
                  str(ROOT / "configs" / "search" / "sequences.yaml"), *args, "--dir", str(tmp_path / "s"))
    assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("index, seeds", [(0, (0, 1, 2)), (1, ())])
def test_only_tuner_zero_trains_the_winner(index, seeds):
    """Tuners started together (a Kubernetes tuning job's pods) share one study; one trains the winner."""
    from types import SimpleNamespace

    from pipeline.tuning.tune import TuneRequest

    args = SimpleNamespace(config=CONFIG, overrides=["data.dir=d"], space="s.yaml", trials=4, workers=1, study=None,
                           dir=None, storage=None, timeout=None, pruner="median", seed=0, final_seeds="0,1,2",
                           folds=None, index=index)
    assert TuneRequest.from_args(args).final_seeds == seeds
