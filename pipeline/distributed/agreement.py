"""Agreements between ranks: one decision for all, and no rank left waiting at a barrier.

Two shapes recur wherever the ranks must act as one:
- `on_main`: the main process decides (takes the lease, picks the checkpoint to resume) and every
  rank learns the outcome, or raises the same error;
- `fail_together`: each rank did its part (wrote its files); if any failed, every rank raises one
  error that names which rank failed and why.
An error raised the same way on every rank is `shared`, and only the main process prints it.
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

from pipeline.errors import UserError

T = TypeVar("T")


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (collective: every rank must call it)."""
    if accelerator.num_processes == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(votes, reduction="sum").item() > 0)


def on_main(accelerator, fn: Callable[[], T], explain: Callable[[OSError], UserError]) -> T:
    """Collective: fn() on the main process; every rank gets its value (which must pickle), or raises
    its error: a UserError as it is, an OSError as `explain` words it."""
    outcome: list = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", fn())]
        except UserError as err:
            outcome = [("error", err)]
        except OSError as err:
            outcome = [("error", explain(err))]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        value.shared = True
        raise value
    return value


def fail_together(accelerator, failure: BaseException | None,
                  error: Callable[[str], UserError] | None = None) -> None:
    """Collective: if any rank failed (its `failure` is not None), every rank raises one error with the
    reasons of every failed rank ("rank 1: [Errno 28] No space left on device"; ranks that failed alike
    share one reason). `error` words it; without it, the first failed rank's UserError is raised again
    with every rank's reasons, its exit code kept."""
    if not any_rank(accelerator, failure is not None):
        return
    mine = None if failure is None else (accelerator.process_index, str(failure), getattr(failure, "exit_code", 1),
                                         getattr(failure, "label", "error"))
    reports = [mine]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        reports = gather_object([mine])
    failed = [r for r in reports if r is not None]
    texts = list(dict.fromkeys(text for _, text, _, _ in failed))
    if len(texts) == 1 and len(failed) == accelerator.num_processes:
        reasons = texts[0]
    else:
        reasons = "; ".join(f"rank {', '.join(str(r) for r, t, _, _ in failed if t == text)}: {text}" for text in texts)
    if error is not None:
        err = error(reasons)
    elif reasons == str(failure) and isinstance(failure, UserError):
        err = failure  # every rank failed alike: its own error, class and all
    else:
        err = UserError(reasons)
        err.exit_code, err.label = failed[0][2], failed[0][3]
    err.shared = True
    raise err
