"""The search space (pipeline/tuning/space.py): what it draws becomes overrides train.py reads back as they
were, and a space that names no config key or a value the config refuses exits 2 naming the key."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import ROOT, run_py

from pipeline.config import load_config
from pipeline.errors import ConfigError
from pipeline.tuning.space import CANDIDATE, load_space, override

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
    (["--trials", "2", "--processes", "0"], "--processes (0)"),
    (["--trials", "2", "--processes", "3"], "train.batch_size 32 on 3 process(es) (--processes)"),
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
    assert _request(index=index).final_seeds == seeds


def _request(**given):
    """launch/tune.py's request from its parsed flags: their defaults, a study of 4 trials, and `given`."""
    from types import SimpleNamespace

    from pipeline.tuning.tune import TuneRequest

    flags = dict(config=CONFIG, overrides=["data.dir=d"], space="s.yaml", trials=4, workers=1, study=None, dir=None,
                 storage=None, timeout=None, pruner="median", seed=0, final_seeds="0,1,2", folds=None, index=0,
                 processes=1, no_refit=False)
    return TuneRequest.from_args(SimpleNamespace(**{**flags, **given}), ROOT / "launch" / "train.py")


@pytest.mark.parametrize("folds, flags, keep_best, refit", [
    ([Path("f0"), Path("f1")], {}, True, "the winner keeps its best evaluation"),  # keep_best chooses on val
    ([Path("f0"), Path("f1")], {"no_refit": True}, False, None),
    ([None], {}, False, None),  # the study chose on the data set's own val split: train as the trials did
])
def test_the_winner_is_refit_only_where_the_trials_cross_validated(tmp_path, capsys, folds, flags, keep_best, refit):
    from pipeline.tuning.tune import _refit

    (tmp_path / "best.yaml").write_text(yaml.safe_dump(load_config(CONFIG, [
        "data.dir=d", f"eval.keep_best={str(keep_best).lower()}"]).to_dict()))
    assert _refit(_request(dir=str(tmp_path), **flags), folds) is None
    out = capsys.readouterr().out
    assert (refit in out) if refit else not out


# --- a list of candidates (a recipe comparison) ----------------------------------------------------

@pytest.mark.parametrize("spec", sorted(p.name for p in (ROOT / "benchmarks" / "recipes").glob("*.yaml")))
def test_shipped_candidate_lists_load_and_each_candidate_is_a_valid_config(spec):
    text = (ROOT / "benchmarks" / "recipes" / spec).read_text()
    config = re.search(r"--config (\S+)", text).group(1)  # each file's header names the config it changes
    space = load_space(ROOT / "benchmarks" / "recipes" / spec, ROOT / config, ["data.dir=data/fsdd"])
    assert [v[CANDIDATE] for _, v in space.queue({})] == [c["name"] for c in yaml.safe_load(text)["candidates"]]
    for _, values in space.queue({}):
        load_config(ROOT / config, space.overrides(values))


def test_a_candidate_is_its_overrides_and_the_list_is_the_queue(tmp_path):
    path = _space(tmp_path, "candidates:\n  - {name: plain, overrides: [model.frontend=none], why: the LSTM alone}\n"
                            "  - {name: as-given}\n")
    space = load_space(path, CONFIG, [])
    assert space.queue({"x": 1}) == [("candidate plain", {CANDIDATE: "plain"}), ("candidate as-given", {CANDIDATE: "as-given"})]
    assert space.overrides({CANDIDATE: "plain"}) == ["model.frontend=none"]
    assert space.overrides({CANDIDATE: "as-given"}) == []
    assert space.of(load_config(CONFIG)) == {}, "a list says itself whether the config as given is a candidate"


@pytest.mark.parametrize("text, message", [
    ("candidates:\n  - {name: a, overrides: [optim.lrate=0.1]}\n  - {name: b}\n", "candidate a: its overrides are refused"),
    ("candidates:\n  - {name: a}\n  - {name: a, overrides: [optim.lr=0.1]}\n", "two candidates are named 'a'"),
    ("candidates:\n  - {name: a}\n", "two or more candidates"),
    ("candidates:\n  - {name: a, config: configs/fsdd.yaml}\n  - {name: b}\n", r"candidates\[0\]: config"),
    ("candidates:\n  - {name: a b}\n  - {name: b}\n", r"candidates\[0\]: name"),
    ("candidates:\n  - {name: a}\n  - {name: b}\noptim.lr: {type: float, low: 0.001, high: 0.01}\n", "stands alone"),
    ("candidates:\n  - {name: a}\n  - {name: b}\nstart:\n  - {name: c, set: {optim.lr: 0.01}}\n", "has no starting points"),
])
def test_a_bad_candidate_list_is_refused_naming_the_candidate(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(_space(tmp_path, text), CONFIG, [])


@pytest.mark.parametrize("config,spec,report", [
    ("configs/fsdd.yaml", "fsdd.yaml", "cpu-select-fsdd.json"),
    ("configs/japanese_vowels.yaml", "japanese_vowels.yaml", "cpu-select-jv.json"),
])
def test_a_tuned_recipe_is_its_comparisons_winner(config, spec, report):
    """The shipped recipe is configs/sequences.yaml with the winning candidate's overrides, nothing else
    (where it writes to and which data it reads aside), as the committed comparison report says."""
    winner = json.loads((ROOT / "benchmarks" / "results" / report).read_text())["winner"]
    space = load_space(ROOT / "benchmarks" / "recipes" / spec, CONFIG, [])
    shipped = load_config(ROOT / config).to_dict()
    chosen = load_config(CONFIG, space.overrides({CANDIDATE: winner})).to_dict()
    for cfg in (shipped, chosen):
        cfg.pop("output_dir"), cfg["data"].pop("dir"), cfg["wandb"].pop("tags")
    assert shipped == chosen


# --- starting points of a space of ranges ------------------------------------------------------------

def test_starting_points_follow_the_config_as_given_each_over_it(tmp_path):
    path = _space(tmp_path, "optim.lr: {type: float, low: 0.0001, high: 0.01, log: true}\n"
                            "model.frontend: {type: categorical, choices: [none, conv]}\n"
                            "data.jitter: {type: float, low: 0.0, high: 0.2}\n"
                            "start:\n  - {name: plain-fast, set: {model.frontend: none, optim.lr: 0.01}, why: w}\n"
                            "  - {name: plain, set: {model.frontend: none}}\n"
                            "  - {name: as-given, set: {data.jitter: 0}}\n")
    space = load_space(path, CONFIG, [])
    assert space.starts["as-given"].set == {"data.jitter": 0.0} and type(space.starts["as-given"].set["data.jitter"]) is float
    given = space.of(load_config(CONFIG, ["model.frontend=conv"]))
    assert given == {"optim.lr": 0.003, "model.frontend": "conv", "data.jitter": 0.0}
    assert space.queue(given) == [("the config as given", given),
                                  ("start plain-fast", {**given, "optim.lr": 0.01, "model.frontend": "none"}),
                                  ("start plain", {**given, "model.frontend": "none"})], "a start equal to an earlier entry is dropped"
    assert list(space.params) == ["optim.lr", "model.frontend", "data.jitter"], "start is not a key of the space"
    # A config the space does not hold (a learning rate above its range): not queued; the starts keep its other values.
    given = space.of(load_config(CONFIG, ["model.frontend=conv", "optim.lr=0.05"]))
    assert space.outside(given) == ["optim.lr=0.05"]
    assert space.queue(given) == [("start plain-fast", {"optim.lr": 0.01, "model.frontend": "none", "data.jitter": 0.0}),
                                  ("start plain", {"model.frontend": "none", "data.jitter": 0.0}),
                                  ("start as-given", {"model.frontend": "conv", "data.jitter": 0.0})]
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    from pipeline.tuning.study import enqueue_first

    line = enqueue_first(study, space, given, 2, tmp_path)
    assert "not the config as given: optim.lr=0.05 lie outside" in line and "--trials 2 runs the first 2" in line
    drawn = space.suggest(study.ask())
    assert (drawn["optim.lr"], drawn["model.frontend"], drawn["data.jitter"]) == (0.01, "none", 0.0)


def test_the_shipped_starting_points_are_configs_the_study_runs_first(tmp_path):
    from pipeline.tuning.study import enqueue_first

    space = load_space(ROOT / "configs" / "search" / "sequences.yaml", CONFIG, [])
    assert set(space.starts) == {"per-series", "conv-frontend", "augment"}
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    assert "the config as given, start per-series, start conv-frontend, start augment" in \
        enqueue_first(study, space, space.of(load_config(CONFIG)), 40, tmp_path)
    drawn = [space.suggest(study.ask()) for _ in range(4)]
    assert drawn[1] == {**drawn[0], "model.series_norm": True} and drawn[0]["model.series_norm"] == "both"
    assert (drawn[0]["model.conv_branch"], drawn[0]["model.frontend"], drawn[0]["model.readout_dropout"]) == (True, "none", 0.8)
    assert drawn[2] == {**drawn[0], "model.frontend": "conv", "model.conv_branch": False, "model.readout_dropout": 0.0,
                        "model.series_norm": False}
    assert drawn[3] == {**drawn[0], "data.jitter": 0.1, "data.scale": 0.1, "data.time_mask": 0.1}
    for values in drawn:
        load_config(CONFIG, space.overrides(values))
    assert enqueue_first(study, space, {}, 40, tmp_path) == "", "a study that has trials queues nothing again"


def test_tuners_started_together_queue_the_starting_points_once(tmp_path, monkeypatch):
    """Four tuners of one new study on one journal at the same moment: one queue between them. A tuner of index
    > 0 (a pod of a tuning job) leaves the queue to tuner 0, waiting for it."""
    import threading

    from pipeline.tuning import study as study_mod

    space = load_space(ROOT / "configs" / "search" / "sequences.yaml", CONFIG, [])
    given = space.of(load_config(CONFIG))
    ready = threading.Barrier(4)

    def tuner() -> None:
        study = study_mod.open_study("s", study_mod.storage_for(None, tmp_path), seed=0, pruner="median")
        ready.wait()
        study_mod.enqueue_first(study, space, given, 40, tmp_path)

    threads = [threading.Thread(target=tuner) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = study_mod.open_study("s", study_mod.storage_for(None, tmp_path), seed=0, pruner="median")
    assert len(study.get_trials()) == len(space.queue(given)) == 1 + len(space.starts), "the config, then each start"

    monkeypatch.setattr(study_mod, "QUEUE_WAIT_S", 0.5)
    late = optuna.create_study(direction="maximize")
    started = time.monotonic()
    assert study_mod.enqueue_first(late, space, given, 40, tmp_path / "late", index=1) == ""
    assert late.get_trials() == [] and time.monotonic() - started >= 0.5, "tuner 1 waited, and queued nothing"


def test_a_study_is_joined_only_with_the_pruner_and_folds_it_was_begun_with(tmp_path):
    from pipeline.tuning.study import open_study, storage_for

    open_study("s", storage_for(None, tmp_path), seed=0, pruner="median", folds=3)
    open_study("s", storage_for(None, tmp_path), seed=0, pruner="median", folds=3)
    with pytest.raises(ConfigError, match="begun with --pruner median over 3 fold"):
        open_study("s", storage_for(None, tmp_path), seed=0, pruner="hyperband", folds=3)
    with pytest.raises(ConfigError, match="asks for --pruner median over 1"):
        open_study("s", storage_for(None, tmp_path), seed=0, pruner="median", folds=1)


@pytest.mark.parametrize("text, message", [
    ("start:\n  - {name: a, set: {optim.lr: 0.5}}\n", r"start a, key optim.lr: 0.5 is outside 0.0001..0.1"),
    ("start:\n  - {name: a, set: {optim.lr: 1e-3}}\n", r"start a, key optim.lr: '1e-3' is not a number"),
    ("start:\n  - {name: a, set: {optim.lr: null}}\n", r"start a, key optim.lr: None is not a number"),
    ("start:\n  - {name: a, set: {model.num_layers: 1.5}}\n", r"key model.num_layers: 1.5 is not a whole number"),
    ("start:\n  - {name: a, set: {model.num_layers: 2}}\n", r"key model.num_layers: 2 is outside 1..3 in steps of 2"),
    ("start:\n  - {name: a, set: {model.dropout: 0.1}}\n", r"start a: model.dropout is not one of the space's keys"),
    ("start:\n  - {name: a, set: {}}\n", r"start\[0\]: set"),
    ("start:\n  - {name: a, set: {optim.lr: 0.01}}\n  - {name: a, set: {optim.lr: 0.001}}\n", "two starting points are named 'a'"),
    ("start: {name: a}\n", "must list starting points"),
    ("start:\n", "must list starting points"),
    ("start:\n  - {name: a, set: {optim.lr: 0.01}, lr: 1}\n", r"start\[0\]: lr"),
])
def test_a_bad_starting_point_is_refused_naming_it(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_space(_space(tmp_path, "optim.lr: {type: float, low: 0.0001, high: 0.1, log: true}\n"
                                    "model.num_layers: {type: int, low: 1, high: 3, step: 2}\n" + text), CONFIG, [])


def test_a_list_of_candidates_bounds_the_study_and_ranges_need_a_size():
    candidates = load_space(ROOT / "benchmarks" / "recipes" / "conv_models.yaml", CONFIG, [])
    assert candidates.study_size(None) == 3 and candidates.study_size(2) == 2
    with pytest.raises(ConfigError, match="lists 3 candidates"):
        candidates.study_size(4)
    ranges = load_space(ROOT / "configs" / "search" / "sequences.yaml", CONFIG, [])
    assert ranges.study_size(40) == 40
    with pytest.raises(ConfigError, match="--trials N is needed"):
        ranges.study_size(None)
