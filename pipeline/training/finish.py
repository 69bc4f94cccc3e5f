"""The end of a run: the one score on test, the final model, summary.json, the plots, the last line.

A run stopped early (SIGTERM, train.stop_at_step) is paused, not finished: test is scored only
when every step has run, so that its resumed run logs what an uninterrupted one does.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch

from pipeline.distributed.preemption import Preempted
from pipeline.model import save_trained
from pipeline.scoring import EvalResult
from pipeline.training.outputs import write_json_atomic, write_plots
from pipeline.training.parts import Run


def end_run(t: Run, stopped_by: str | None) -> dict[str, Any]:
    """Collective: every rank's sample ids and skipped samples; the main process writes the rest and
    returns the summary (the other ranks: {})."""
    t.bar.close()
    t.batches.save_sample_ids(t.out, t.accelerator.process_index)
    counts = torch.tensor([float(t.batches.skipped_samples), *t.batches.padding.total], dtype=torch.float64,
                          device=t.device)
    skipped, padded, real = t.accelerator.reduce(counts, reduction="sum").tolist()
    # Fixed-length data pads nothing: its waste is 0, a figure like any other, not a missing one.
    ended = {"padding_waste": padded / real if t.data.plan.ragged and real else 0.0,
             "data_bytes_read": _bytes_read(t)}
    if stopped_by == "SIGTERM":
        raise Preempted(
            f"SIGTERM received: every rank stopped after step {t.state.step} of {t.total_steps} and its checkpoint "
            f"is in {t.checkpointer.root}; continue with --resume auto"
        )
    summary = _finish(t, int(skipped), stopped_by, ended) if t.main else {}
    t.accelerator.wait_for_everyone()
    return summary


def _bytes_read(t: Run) -> list[int]:
    """Collective: the bytes of training shards each rank read in this launch, rank by rank."""
    mine = torch.tensor([t.batches.bytes_read], dtype=torch.int64, device=t.device)
    per_rank = t.accelerator.gather(mine).tolist()
    # W&B's summary, not metrics.jsonl: a resumed run reads windows again, and its events must stay those
    # of the uninterrupted run.
    t.tracker.summarize({"data/bytes_read_total": sum(per_rank), "data/bytes_read_max_rank": max(per_rank),
                         "data/split_bytes": t.data.manifest.split("train").bytes})
    return per_rank


def _finish(t: Run, skipped_samples: int, stopped_by: str | None, ended: dict[str, Any]) -> dict[str, Any]:
    """Main process: the one score on test, final model, summary.json, plots, the last line of the log."""
    state, manifest = t.state, t.data.manifest
    last, kept_step = _kept(t)
    if skipped_samples:
        t.log(f"data.on_error=skip: the places of {skipped_samples} unreadable samples were taken by other samples "
              "of their windows; every step and every other sample kept its place")
    test = None
    if t.finished and "test" in manifest.splits and t.cfg.eval.score_test:
        test = last if t.eval_split == "test" else t.evaluator_for("test")(t.shipped)
        t.sink.record(state.step, {"test/accuracy": test.accuracy, "test/loss": test.loss})
    card = t.card.model_copy(update={"wandb_run_id": t.tracker.run_id, "steps": state.step, "weights": t.info["weights"],
                                     "ema": t.cfg.train.ema.model_dump() if t.ema else None, "kept_step": kept_step,
                                     "eval_batch_size": t.cfg.eval.batch_size})
    save_trained(t.shipped, t.out / "model", card)
    summary = {**_summary(t, skipped_samples, last, test, ended), "kept_step": kept_step}
    write_json_atomic(t.out / "summary.json", summary)
    write_plots(t.out / "plots", t.sink.log.read(), test.confusion if test else None, manifest.class_names,
                t.eval_split)
    scores = (f"final {t.eval_split} accuracy {last.accuracy:.4f} (best {state.best_accuracy:.4f})" if last
              else "no evaluation during training (eval.split: none)" if t.eval_split == "none" else "no evaluation yet")
    if kept_step != state.step:
        scores += f", the model kept from step {kept_step} (eval.keep_best)"
    scores += f", test accuracy {test.accuracy:.4f}" if test else _why_no_test(t)
    if state.stopped_early:
        t.log(f"done early: {state.step} of {t.total_steps} steps (eval.patience: {t.cfg.eval.patience} evaluations "
              f"without a better one), {scores}, {summary['wall_s']:.1f} s; outputs in {t.out}")
    elif summary["completed"]:
        t.log(f"done: {state.step} steps, {scores}, {summary['wall_s']:.1f} s; outputs in {t.out}")
    else:
        t.log(f"stopped at step {state.step} of {t.total_steps} ({stopped_by}), {scores}; continue with --resume auto")
    return summary


def _kept(t: Run) -> tuple[EvalResult | None, int]:
    """The evaluation of the weights that model/ will hold, and their step. eval.keep_best, once every step has run:
    the best evaluation's weights go into the shipped model (training is over) and are scored on eval.split again
    (a resumed run carries those weights, not their scores); otherwise the last evaluation's."""
    best = t.checkpointer.best
    if t.evaluator is None:  # eval.split: none
        return None, t.state.step
    if best is None or not t.finished or t.state.best_step == t.state.step:
        return t.evaluator.last, t.state.step
    t.shipped.load_state_dict(best)
    return t.evaluator(t.shipped), t.state.best_step  # the split it evaluated on, already in memory


def _why_no_test(t: Run) -> str:
    if "test" not in t.data.manifest.splits:
        return ", no test split to score"
    return ", test not read (eval.score_test: false)" if not t.cfg.eval.score_test else ", test not scored until the run completes"


def _summary(t: Run, skipped_samples: int, last: EvalResult | None, test: EvalResult | None,
             ended: dict[str, Any]) -> dict[str, Any]:
    state, layout = t.state, t.data.layout
    return {
        **t.info,
        **ended,
        "steps": state.step,
        "samples_seen": state.samples_seen,
        "global_batch_size": layout.global_batch,
        "accumulation_steps": layout.accumulation,
        "wall_s": t.sink.elapsed(),
        "train_samples_per_s": t.window.samples_per_s,
        # On eval_split, of the weights model/ holds (their average with train.ema).
        "final_eval_accuracy": last.accuracy if last else None,
        "final_eval_loss": last.loss if last else None,
        "final_eval_balanced_accuracy": last.balanced_accuracy if last else None,
        "final_eval_macro_f1": last.macro_f1 if last else None,
        "best_eval_accuracy": state.best_accuracy,
        # The same weights, scored once on test at the end.
        "test_accuracy": test.accuracy if test else None,
        "test_loss": test.loss if test else None,
        "test_balanced_accuracy": test.balanced_accuracy if test else None,
        "test_macro_f1": test.macro_f1 if test else None,
        # Per evaluation event of this process (with train.ema, both passes of one event count once).
        "eval_seconds_mean": t.evaluator.mean_seconds if t.evaluator else None,
        "evals": len(t.evaluator.seconds) if t.evaluator else 0,
        "skipped_steps": state.skipped_steps,
        "skipped_samples": skipped_samples,
        "resumed": t.resumed_from is not None,
        "completed": t.finished,
        "stopped_early": state.stopped_early,
        "train_state": asdict(state),
    }
