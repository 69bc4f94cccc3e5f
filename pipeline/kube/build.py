"""From the user's config file and flags to a validated JobSpec.

The config is validated here with exactly the overrides the pods will use, so a job that
reaches the cluster has a config the trainer accepts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from pipeline.config import Config, load_config, load_yaml
from pipeline.data import canonical
from pipeline.data.manifest import load_manifest
from pipeline.data.order import BatchLayout
from pipeline.errors import ConfigError, UserError
from pipeline.kube.command import OWNED_KEYS, config_overrides, pod_paths
from pipeline.kube.spec import Format, JobSpec, TuneSpec, slugify, validate

# A ConfigMap holds at most 1 MiB; keep room for the config and metadata.
_MAX_MANIFEST_BYTES = 900 * 1024


def _check_overrides(overrides: list[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWNED_KEYS:
            raise UserError(
                f"override '{item}': {key} is set by submit to the mounted volumes; "
                "use --data-pvc / --data-url / --output-pvc instead"
            )


def _shipped_manifest(cfg: Config) -> str:
    """The local manifest, shipped with the config: the trainer reads it from data.dir, shards from the URL."""
    load_manifest(cfg.data.dir, cfg.data.dataset)  # DataError with the preparation command if absent
    text = (Path(cfg.data.dir) / "manifest.json").read_text()
    if len(text.encode()) > _MAX_MANIFEST_BYTES:
        raise UserError(f"{cfg.data.dir}/manifest.json is larger than a ConfigMap can hold; use --data-pvc")
    return json.dumps(json.loads(text), separators=(",", ":"), sort_keys=True)


def tune_spec(space: str | Path, trials: int, config: str | Path, overrides: list[str], **storage: Any) -> TuneSpec:
    """--tune: the search space, validated against the config as launch/tune.py will, shipped byte for byte;
    `storage`: TuneSpec's other fields (storage or its secret, processes per trial, final seeds)."""
    from pipeline.tuning.space import load_space

    load_space(space, config, overrides).study_size(trials)  # a list of candidates bounds the trials
    return TuneSpec(Path(space).read_text(), trials, **storage)


def build_spec(config: str | Path, fmt: Format = "job", **options: Any) -> JobSpec:
    """Read and validate the config, then fill in what the spec derives from it.

    `options` are JobSpec fields (name, image, nodes, ...); None means "derive or default".
    """
    path = Path(config)
    overrides = list(options.pop("overrides", None) or [])
    _check_overrides(overrides)
    # First with the user's overrides only, so errors name what the user wrote, not our paths.
    cfg = load_config(path, overrides)
    try:
        config_text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from None

    data_url = options.get("data_url")
    if not options.get("data_pvc") and not data_url:
        if not cfg.data.base_url:
            raise UserError(
                "the pods need the dataset: pass --data-pvc CLAIM (a volume holding the prepared shards and "
                "manifest.json) or --data-url URL (where the shards are served from)"
            )
        data_url = cfg.data.base_url
    fields: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    fields.update(
        name=options.get("name") or slugify(path.stem),
        config_text=config_text,
        data_url=data_url,
        overrides=tuple(overrides),
        loader_workers=cfg.data.num_workers,
        mixed_precision=cfg.train.mixed_precision,
        wandb_project=cfg.wandb.project,
        wandb_entity=cfg.wandb.entity,
    )
    spec = JobSpec(**fields)
    validate(spec, fmt)
    if data_url:
        spec = dataclasses.replace(spec, manifest_text=_shipped_manifest(cfg))
    # The exact config the pods will load: the file, the user's overrides, the volume paths.
    final = load_config(path, config_overrides(spec, pod_paths(spec)))
    # Every rank count the job can have must divide its global batch, or the trainer refuses at start.
    for world in spec.world_sizes:
        BatchLayout.make(final.train.global_batch_size, final.train.batch_size, world,
                         " (--trial-processes)" if spec.tune is not None else
                         f" ({world // spec.procs_per_node} node(s) x {spec.procs_per_node}, which this job can run with)")
    return _with_streams(spec, final, _sets_streams(config_text, overrides))


def _sets_streams(config_text: str, overrides: list[str]) -> bool:
    """Whether the user chose data.canonical_streams (in the file or an override), even as 1."""
    raw = load_yaml(config_text) or {}  # the loader load_config used: the file has passed it
    in_file = isinstance(raw.get("data"), dict) and "canonical_streams" in raw["data"]
    return in_file or any(o.split("=", 1)[0].strip() == "data.canonical_streams" for o in overrides)


def _with_streams(spec: JobSpec, final: Config, set_by_user: bool) -> JobSpec:
    """data.canonical_streams that fits every process count of the job, so that each rank reads its share at
    every size an elastic job can shrink to: with a fixed global batch, a multiple of every count (their least
    common multiple); with none, the global batch grows with the processes and the count must divide each."""
    worlds = spec.world_sizes
    fixed = final.train.global_batch_size is not None
    fitting = math.lcm(*worlds) if fixed else math.gcd(*worlds)
    if not set_by_user:
        return spec if fitting == 1 else dataclasses.replace(
            spec, overrides=(*spec.overrides, f"data.canonical_streams={fitting}"))
    streams = final.data.canonical_streams
    short = [w for w in worlds if (streams % w if fixed else w % streams)]
    if streams > 1 and short:
        relation = "a multiple of" if fixed else "a divisor of"
        raise UserError(
            f"data.canonical_streams {streams} is not {relation} {', '.join(map(str, short))}, a number of processes "
            f"this job can run with: those ranks would read more than their share. Use {fitting}, or leave it out "
            "and submit.py sets it")
    for world in worlds:  # and it cuts each global batch into whole micro-batches per stream
        canonical.check_streams(BatchLayout.make(final.train.global_batch_size, final.train.batch_size, world), streams)
    return spec
