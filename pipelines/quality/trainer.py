"""The Hugging Face Trainer as both training jobs drive it: arguments (best checkpoint kept), the run with its
numbers, a progress line for logs, and the summary lines both jobs print.

Example::

    args = trainer_args(CrossEncoderTrainingArguments, cfg.train, scratch, "cpu", rows, "eval_ndcg@10")
    out = train(CrossEncoderTrainer(model=model, args=args, ...), progress_callback(16), "eval_ndcg@10")
"""

from __future__ import annotations

import sys
import time
from typing import Any

EVERY_S = 15.0  # seconds between progress lines when stderr is not a terminal


def trainer_args(args_cls, t, scratch: str, device: str, rows: int, metric: str | None, **extra):
    """Training arguments for either trainer. With ``metric`` (the evaluator's key): evaluate each epoch (every
    ceil(max_steps / 4) steps when max_steps is set), checkpoint into ``scratch``, load the best at the end."""
    from transformers import TrainingArguments

    from pipelines.models import cuda_bf16

    total = t.max_steps or -(-int(rows * t.epochs) // t.batch_size)
    bf16 = device == "cuda" and cuda_bf16()  # not emulated bf16 (before Ampere): slow
    # transformers 5 dropped warmup_ratio (sentence-transformers still accepts it, with a warning): a float < 1
    # in warmup_steps is the ratio there.
    old_api = "warmup_ratio" in TrainingArguments.__dataclass_fields__
    extra.update({"warmup_ratio": t.warmup_ratio} if old_api else {"warmup_steps": t.warmup_ratio})
    if metric is None:
        extra.update(eval_strategy="no", save_strategy="no")
    else:
        every = -(-t.max_steps // 4) if t.max_steps else None
        strategy = "steps" if every else "epoch"
        extra.update(eval_strategy=strategy, save_strategy=strategy, load_best_model_at_end=True,
                     metric_for_best_model=metric, greater_is_better=True, save_total_limit=1, save_only_model=True,
                     **({"eval_steps": every, "save_steps": every} if every else {}))
    return args_cls(output_dir=scratch, num_train_epochs=t.epochs, max_steps=t.max_steps or -1,
                    per_device_train_batch_size=t.batch_size, learning_rate=t.learning_rate, seed=t.seed,
                    bf16=bf16, fp16=device == "cuda" and not bf16, use_cpu=device == "cpu", report_to="none",
                    logging_steps=max(1, min(50, total // 20)), dataloader_num_workers=0,
                    disable_tqdm=not sys.stderr.isatty(), **extra)


def train(trainer, callback, metric: str | None) -> dict[str, Any]:
    """Run ``trainer``; its steps, loss, speed, and (with ``metric``) each evaluation and the best step kept."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our callback writes timed lines
    result = trainer.train()
    seen = callback.losses or [result.training_loss]
    out = {"steps": result.global_step, "epochs": round(trainer.state.epoch or 0, 3),
           "examples_per_second": round(result.metrics.get("train_samples_per_second", 0.0), 2),
           "loss": {"first": round(seen[0], 4), "final": round(seen[-1], 4), "mean": round(result.training_loss, 4)}}
    if metric:
        best = trainer.state.best_model_checkpoint
        out["best_step"] = int(best.rsplit("-", 1)[-1]) if best else None
        out["checkpoints"] = [{"step": e["step"], "ndcg@10": round(e[metric], 4)}
                              for e in trainer.state.log_history if metric in e]
    return out


def progress_callback(batch_size: int, unit: str = "pairs"):
    """A line on stderr every ~15 s while training (step/total, last logged loss, examples/s); silent on a TTY,
    where the Trainer's own bar runs."""
    from transformers import TrainerCallback

    class TrainProgress(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []
            self.quiet = sys.stderr.isatty()
            self.start = self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if not self.quiet and (now - self.last >= EVERY_S or state.global_step == state.max_steps):
                self.last, elapsed = now, now - self.start
                loss = f"{self.losses[-1]:.4f}" if self.losses else "-"
                sys.stderr.write(f"train: step {state.global_step}/{state.max_steps}, loss {loss} "
                                 f"[{elapsed:,.0f}s, {state.global_step * batch_size / elapsed:,.1f} {unit}/s]\n")
                sys.stderr.flush()

    return TrainProgress()


def summary_lines(report: dict[str, Any], what: str) -> tuple[str, list[str]] | str:
    """The summary of a cached or failed run (a string), else (head, the lines every trainer prints)."""
    head = f"{report['job']} run {report['run_id']}: {report['status']}"
    if report["status"] == "cached":
        return (f"{head}\n  reusing the {what} trained at {report.get('trained_at')} in {report['output']} "
                f"(pass --force to retrain)\n  report: {report.get('report_path')}")
    if report["status"] != "succeeded":
        return (f"{head} ({report.get('error')})\n  the previous {what} in {report['output']} (if any) is intact; "
                f"report: {report.get('report_path')}")
    q, j, p, ss = report["queries"], report["judgments"], report["pairs"], report["self_supervised"]
    tr = report["training"]
    return head, [
        (f"  queries: {q['used']:,} used of {q['judged']:,} judged ({q['train']:,} train, {q['validation']:,} "
         f"validation; {q['without_positive_in_passages']:,} without a positive in passages, "
         f"{q['beyond_max_queries']:,} beyond max_queries, {q['not_in_queries_file']:,} not in the queries file)"),
        f"  judgments: {j['read']:,} read, {j['used']:,} used, {j['skipped_not_in_passages']:,} not in passages",
        (f"  pairs: {p['total']:,} = {p['positive']:,} positive + {p['negative']:,} hard negatives "
         f"({ss['pairs']:,} self-supervised of {ss['requested']:,} requested)"),
        (f"  training: {tr['steps']:,} steps on {tr['device']}, {tr['examples_per_second']} examples/s, "
         f"loss {report['loss']['first']} → {report['loss']['final']}"
         + (f", best checkpoint at step {tr['best_step']}" if tr.get("best_step") else "")),
        "  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in report["seconds"].items()),
    ]
