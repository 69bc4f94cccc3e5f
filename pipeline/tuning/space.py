"""A search space: a YAML file of config keys and the distribution each is drawn from.

    optim.lr: {type: float, low: 3.0e-4, high: 1.0e-2, log: true}
    model.hidden_size: {type: int, low: 64, high: 256, step: 64}
    model.frontend: {type: categorical, choices: [none, conv]}

Validated like a config, before any trial runs: a key the config does not have, a range that is empty or
holds a value the config refuses (a dropout of 1.5, a log scale from 0) exits 2 naming the file and the key.

A space may instead list named candidates, each a set of overrides of the config (a recipe comparison):

    candidates:
      - {name: plain, overrides: [model.frontend=none], why: the LSTM alone}
      - {name: conv-frontend, overrides: []}

The study then runs each candidate once, in the file's order, as its trials; the sampler draws nothing.

A space of ranges may name starting points, tried right after the config as given and before the sampler
draws: settings known to win on some data (a recipe), each a few of the space's keys, the rest the config's:

    start:
      - {name: per-series, set: {model.series_norm: true}, why: series whose level differs within a class}

A study of a dozen trials over a dozen keys is otherwise close to a random search, which may never draw
the one combination that works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from pipeline.config import Config, load_config, load_yaml
from pipeline.errors import ConfigError


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    def holds(self, value: Any) -> bool:
        try:
            self.accept(value)
        except ValueError:
            return False
        return True


class _Range(_Dist):
    """A number between low and high, on a log scale or in steps."""

    @model_validator(mode="after")
    def _range(self) -> "_Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        stepped = self.step is not None and (self.type == "float" or self.step != 1)  # an int's default step is 1
        if self.log and (self.low <= 0 or stepped):
            raise ValueError(f"a log scale needs low > 0 (got {self.low}) and no step")
        return self

    def bounds(self) -> list[Any]:
        return [self.low, self.high]

    def accept(self, value: Any) -> Any:
        """`value` as this range's type where it lies in the range (and on its steps); ValueError saying why not."""
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        whole = number and (isinstance(value, int) or float(value).is_integer())
        if not number or (self.type == "int" and not whole):
            raise ValueError(f"{value!r} is not {'a whole number' if self.type == 'int' else 'a number'}")
        value = int(value) if self.type == "int" else float(value)
        steps = None if self.step is None else (value - self.low) / self.step
        if not self.low <= value <= self.high or (steps is not None and abs(steps - round(steps)) > 1e-6):
            raise ValueError(f"{value!r} is outside {self.low}..{self.high}"
                             + (f" in steps of {self.step}" if self.step is not None else ""))
        return value


class FloatDist(_Range):
    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)

    def suggest(self, trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log, step=self.step)


class IntDist(_Range):
    type: Literal["int"]
    low: int
    high: int
    log: bool = False
    step: int = Field(1, ge=1)

    def suggest(self, trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high, log=self.log, step=self.step)


class CategoricalDist(_Dist):
    type: Literal["categorical"]
    choices: list[Union[None, bool, int, float, str]] = Field(min_length=2)

    @model_validator(mode="after")
    def _distinct(self) -> "CategoricalDist":
        if len({repr(c) for c in self.choices}) != len(self.choices):
            raise ValueError(f"choices must be distinct (got {self.choices})")
        return self

    def bounds(self) -> list[Any]:
        return list(self.choices)

    def accept(self, value: Any) -> Any:
        if not any(value == c and type(value) is type(c) for c in self.choices):
            raise ValueError(f"{value!r} is not one of {self.choices}")
        return value

    def suggest(self, trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)


Dist = Annotated[Union[FloatDist, IntDist, CategoricalDist], Field(discriminator="type")]
_DIST = TypeAdapter(Dist)


def _config_keys(model: type[BaseModel] = Config, prefix: str = "") -> set[str]:
    """Every dotted key a config has, sections and leaves."""
    keys = set()
    for name, field in model.model_fields.items():
        key = prefix + name
        keys.add(key)
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            keys |= _config_keys(kind, key + ".")
    return keys


def _is_leaf(key: str, keys: set[str]) -> bool:
    return key in keys and not any(k.startswith(key + ".") for k in keys)


def override(key: str, value: Any) -> str:
    """`key=value` as train.py reads it: YAML, so that None, booleans and strings come back as they were."""
    return f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"


CANDIDATE = "candidate"  # the one parameter of a space of candidates: the candidate's name


class Candidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    overrides: tuple[str, ...] = ()
    why: str = ""


class Start(BaseModel):
    """A starting point of a space of ranges: values of some of its keys, the others the config's own."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    set: dict[str, Union[None, bool, int, float, str]] = Field(min_length=1)
    why: str = ""


class SearchSpace(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    params: dict[str, Dist]
    candidates: dict[str, Candidate] = Field(default_factory=dict)  # a list of candidates instead of ranges
    starts: dict[str, Start] = Field(default_factory=dict)

    def queue(self, given: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """What a new study runs before the sampler draws, in order, each as (origin, values) and none twice:
        every candidate of a list; or the config as given (`given`: its values of the space's keys), where they
        all lie in the space, then each starting point over the config's values that do (the sampler draws the
        others)."""
        if self.candidates:
            return [(f"candidate {name}", {CANDIDATE: name}) for name in self.candidates]
        inside = {k: v for k, v in given.items() if self.params[k].holds(v)}
        queue = [("the config as given", given)] if given and inside == given else []
        for start in self.starts.values():
            values = {**inside, **start.set}
            if all(values != earlier for _, earlier in queue):
                queue.append((f"start {start.name}", values))
        return queue

    def outside(self, given: dict[str, Any]) -> list[str]:
        """The config's values the space does not hold, as key=value."""
        return [f"{k}={v!r}" for k, v in given.items() if not self.params[k].holds(v)]

    def study_size(self, trials: int | None) -> int:
        """The trials of a study of this space: `trials`, which a list of candidates bounds by its length and
        gives when None; ConfigError where the request cannot be met."""
        if not self.candidates:
            if trials is None:
                raise ConfigError(f"--trials N is needed with {self.path}: how many settings to draw from its ranges")
            return trials
        if trials is not None and trials > len(self.candidates):
            raise ConfigError(f"--trials {trials}: {self.path} lists {len(self.candidates)} candidates, each run "
                              f"once; ask for {len(self.candidates)} trials or fewer")
        return trials or len(self.candidates)

    def suggest(self, trial) -> dict[str, Any]:
        """One point of the space, drawn by the trial's sampler: {config key: value}. A trial queued again with
        the values of an interrupted one gets those; ValueError where the space has changed since."""
        values = {key: dist.suggest(trial, key) for key, dist in self.params.items()}
        outside = [f"{k}={v!r}" for k, v in values.items() if not self.params[k].holds(v)]
        if outside:
            raise ValueError(f"its queued values are outside the search space {self.path} as it is now: "
                             f"{', '.join(outside)}")
        return values

    def of(self, cfg: Config) -> dict[str, Any]:
        """The config's own values of the space's keys ({} for a list of candidates, which says itself whether
        the config as given is one)."""
        if self.candidates:
            return {}
        values = {}
        for key in self.params:
            node: Any = cfg
            for part in key.split("."):
                node = getattr(node, part)
            values[key] = list(node) if isinstance(node, tuple) else node
        return values

    def overrides(self, values: dict[str, Any]) -> list[str]:
        if self.candidates:
            return list(self.candidates[values[CANDIDATE]].overrides)
        return [override(key, value) for key, value in values.items()]


def _read(path: Path) -> dict:
    try:
        raw = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"search space {path} does not exist; pass one like configs/search/sequences.yaml with "
                          "--space") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"search space {path} cannot be read as YAML: {err}") from None
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(f"search space {path} must map config keys to distributions, e.g. `optim.lr: {{type: "
                          "float, low: 0.0003, high: 0.01, log: true}`")
    return raw


def _problems(err: ValidationError) -> str:
    """Each problem of an entry as `field: message`, in one line."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'type'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in err.errors())


def _dist(path: Path, key: str, spec: Any) -> Dist:
    try:
        return _DIST.validate_python(spec)
    except ValidationError as err:
        raise ConfigError(f"search space {path}, key {key}: {_problems(err)}. A distribution is {{type: float|int, low, "
                          "high, log, step}} or {type: categorical, choices: [...]}") from None


def _named(path: Path, items: Any, kind: type[BaseModel], section: str, shape: str, least: int) -> list[Any]:
    """The entries of a list section (candidates, start), each validated by `kind`, their names distinct."""
    noun = "candidates" if section == "candidates" else "starting points"
    if not isinstance(items, list) or len(items) < least:
        at_least = "two or more " if least > 1 else ""
        raise ConfigError(f"search space {path}: `{section}` must list {at_least}{noun}, each {shape}")
    found: list[Any] = []
    for i, item in enumerate(items):
        try:
            entry = kind.model_validate(item)
        except ValidationError as err:
            raise ConfigError(f"search space {path}, {section}[{i}]: {_problems(err)}. Each is {shape}") from None
        if any(entry.name == other.name for other in found):
            raise ConfigError(f"search space {path}: two {noun} are named {entry.name!r}")
        found.append(entry)
    return found


def _candidates(path: Path, items: Any, config: str | Path, overrides: list[str]) -> SearchSpace:
    """A space of named candidates, each one's overrides loaded as a config now."""
    found: dict[str, Candidate] = {}
    for candidate in _named(path, items, Candidate, "candidates", "{name, overrides: [key=value, ...], why} (the config "
                            "they change is --config)", least=2):
        try:
            load_config(config, [*overrides, *candidate.overrides])
        except ConfigError as err:
            raise ConfigError(f"search space {path}, candidate {candidate.name}: its overrides are refused by the "
                              f"config: {err}") from None
        found[candidate.name] = candidate
    choices = CategoricalDist(type="categorical", choices=list(found))
    return SearchSpace(path=str(path), params={CANDIDATE: choices}, candidates=found)


def _starts(path: Path, items: Any, params: dict[str, Dist], config: str | Path, overrides: list[str]) -> dict[str, Start]:
    """The starting points, each value in its key's range and the whole set loaded as a config now."""
    found: dict[str, Start] = {}
    for start in _named(path, items, Start, "start", "{name, set: {key: value, ...}, why} over the space's keys", least=1):
        typed = {}
        for key, value in start.set.items():
            if key not in params:
                raise ConfigError(f"search space {path}, start {start.name}: {key} is not one of the space's keys; a "
                                  "starting point sets keys the space draws (the config as given holds the others)")
            try:
                typed[key] = params[key].accept(value)
            except ValueError as err:
                raise ConfigError(f"search space {path}, start {start.name}, key {key}: {err}") from None
        try:
            load_config(config, [*overrides, *(override(k, v) for k, v in typed.items())])
        except ConfigError as err:
            raise ConfigError(f"search space {path}, start {start.name}: refused by the config: {err}") from None
        found[start.name] = start.model_copy(update={"set": typed})
    return found


def load_space(path: str | Path, config: str | Path, overrides: list[str]) -> SearchSpace:
    """The space in `path`, each key checked against the config and each bound loaded as a config."""
    path = Path(path)
    raw = _read(path)
    if "candidates" in raw:
        if "start" in raw:
            raise ConfigError(f"search space {path}: a list of candidates has no starting points; each candidate is "
                              "run once, in the file's order: put the start's settings into a candidate")
        if len(raw) > 1:
            raise ConfigError(f"search space {path}: a list of candidates stands alone; move "
                              f"{', '.join(str(k) for k in raw if k != 'candidates')} into each candidate's overrides")
        return _candidates(path, raw["candidates"], config, overrides)
    keys = _config_keys()
    params = {}
    starts = raw.pop("start", [])  # a `start:` left empty is an empty list to _starts, which refuses it
    for key, spec in raw.items():
        if not _is_leaf(str(key), keys):
            raise ConfigError(f"search space {path}: {key!r} is not a config key (a setting such as optim.lr; "
                              "check the spelling against configs/*.yaml)")
        params[str(key)] = dist = _dist(path, key, spec)
        for value in dist.bounds():  # each end alone: a value the config refuses is a range to narrow now
            try:
                load_config(config, [*overrides, override(key, value)])
            except ConfigError as err:
                raise ConfigError(f"search space {path}, key {key}: the value {value!r} is refused by the config: "
                                  f"{err}. Narrow the range") from None
    found = _starts(path, starts, params, config, overrides) if starts != [] else {}
    return SearchSpace(path=str(path), params=params, starts=found)
