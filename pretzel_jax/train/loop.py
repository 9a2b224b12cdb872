"""The training loop: mesh, model, state (restored or fresh), data, steps, logging, checkpoints.

Restarting the same command in the same run_dir resumes from the newest checkpoint that passes
its checks: the state, the data iterator position and the per-step keys (`fold_in(rng, step)`)
are all restored, so the loss curve continues exactly; rows of metrics.jsonl past the restored
step (and any report row) are dropped and TensorBoard is told to purge them, so each step is
logged once. No checkpoint is written inside a streak of non-finite steps.

SIGTERM (single process), from the start of `train` to its return: during setup, restore and
the first compile it stops before the first step (nothing new to save); during training it saves
a checkpoint at the next step boundary and returns; during the end-of-run report (the final
checkpoint is complete by then) it abandons the report. Each case logs one line and `train`
returns with `preempted` set. Not handled: SIGTERM before `train` is called (imports, config
loading), and on multi-host runs outside the training loop (there JAX's preemption notifier
reads the signal, and Orbax makes every process stop at the same step).

Pretrained weights enter through weight sources (`pretzel_jax.train.weights`), restored into the
sharded state after init: "frozen" ones at every start (checkpoints record their paths and
content hashes, never their tensors), "init" ones at a fresh start only.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from pretzel_jax.train.checkpoint import Checkpointer
from pretzel_jax.train.config import validate
from pretzel_jax.train.errors import ConfigError, NonFiniteError
from pretzel_jax.train.mesh import make_mesh
from pretzel_jax.train.metrics import MetricsWindow, MetricsWriter
from pretzel_jax.train.optimizer import describe_param_policy
from pretzel_jax.train.state import (
    Fixed,
    ModelBuilder,
    TrainSetup,
    TrainState,
    build_setup,
    eval_key,
    init_rest,
    init_state,
    model_from,
)
from pretzel_jax.train.step import make_eval_step, make_train_step, shard_batch
from pretzel_jax.train.weights import (
    WeightSource,
    check_sources,
    missing_files,
    source_records,
)

log = logging.getLogger(__name__)

# `pretzel_jax.data.make_iterator`'s signature:
# (data_cfg, split, *, process_index, process_count, shuffle=None, num_epochs=None) -> iterator
IteratorFactory = Callable[..., Iterator[dict[str, np.ndarray]]]
# `pretzel_jax.models.report_fn(config)`'s result: (model, config, data, key, run_dir) -> metrics,
# where data(split) iterates one unshuffled epoch of `split` in eval batches.
ReportFn = Callable[..., dict[str, float]]


class _ReportStopped(Exception):
    """SIGTERM arrived during the end-of-run report."""


class _SigtermFlag:
    """Records SIGTERM instead of dying; in the "report" phase it abandons the report. Single
    process only: on multi-host runs the signal is left to JAX's preemption notifier and read
    through Orbax, so that all processes stop at the same step."""

    _MESSAGES = {
        "setup": "SIGTERM during setup: stopping before the first step",
        "train": "SIGTERM: saving a checkpoint at the next step boundary, then stopping",
        "report": "SIGTERM during the end-of-run report: abandoning it (the final checkpoint is "
        "complete; rerun the command to redo the report)",
        "end": "SIGTERM while closing the run: finishing that first",
    }

    def __enter__(self) -> _SigtermFlag:
        self.requested = False
        self.phase = "setup"
        self._installed = (
            jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
        )
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        log.warning(self._MESSAGES[self.phase])
        self.requested = True
        if self.phase == "report":
            raise _ReportStopped

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


class _Run:
    """One training session over a TrainSetup (state and host bookkeeping)."""

    def __init__(
        self,
        setup: TrainSetup,
        run_dir: Path,
        make_iterator: IteratorFactory,
        checkpointer: Checkpointer,
        weight_sources: tuple[WeightSource, ...] = (),
    ):
        self.setup, self.cfg, self.run_dir = setup, setup.config, run_dir
        self.make_iterator = make_iterator
        self.checkpointer = checkpointer
        self.writer: MetricsWriter | None = None  # opened once the start step is known
        self.weight_sources = weight_sources
        self.process = {"process_index": jax.process_index(), "process_count": jax.process_count()}
        self.rest: Fixed | None = None  # set by restore_or_init
        self.data = make_iterator(self.cfg.data, self.cfg.data.train_split, **self.process)
        self.train_step = make_train_step(setup)
        self.eval_step = make_eval_step(setup)
        self.window = MetricsWindow()
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (step, device metrics)
        self.streak = 0  # non-finite steps in a row, as of the last fetched step
        self.postponed_at: int | None = None  # step of a checkpoint postponed by a streak
        self.results: dict[str, Any] = {}

    def restore_or_init(self) -> TrainState:
        """The restored or fresh train state; sets `rest` (frozen params from their weight
        sources). A restore checks the frozen weight files' hashes before loading anything, and
        falls back past damaged checkpoints (`Checkpointer.restore_latest`)."""
        sources = self.weight_sources
        state = self.checkpointer.restore_latest(self.setup.abstract, self.data)
        if state is None:
            log.info("no checkpoint in %s: initialising", self.checkpointer.directory)
            missing_files(sources)
            self.rest = init_rest(self.setup, sources)
            return init_state(self.setup, sources)
        log.info("resumed from %s/%d", self.checkpointer.directory, int(state.step))
        self.rest = init_rest(self.setup, sources)  # "init" sources: the checkpoint's values win
        return state

    def _eval_iterator(
        self, split: str, drop_remainder: bool = False
    ) -> Iterator[dict[str, np.ndarray]]:
        """One unshuffled epoch of `split` in eval batches; the whole split unless
        `drop_remainder` (the sharded eval step needs full batches)."""
        data_cfg = self.cfg.data.copy_and_resolve_references()
        data_cfg.batch_size = data_cfg.eval_batch_size
        data_cfg.drop_remainder = drop_remainder
        return self.make_iterator(data_cfg, split, shuffle=False, num_epochs=1, **self.process)

    def _fetch(self) -> None:
        """Move pending device metrics to the host window; stop on too many non-finite steps."""
        limit = self.cfg.train.max_consecutive_nonfinite
        for step, metrics in jax.device_get(self.pending):
            row = {k: float(v) for k, v in metrics.items()}
            self.window.add(row)
            self.streak = int(row["nonfinite_consecutive"])
            if self.streak >= limit:
                self.pending.clear()
                raise NonFiniteError(self._nonfinite_message(step, row))
        self.pending.clear()

    def _nonfinite_message(self, step: int, row: dict[str, float]) -> str:
        """One line: which steps, that none of them was checkpointed, how to resume."""
        self.checkpointer.wait()  # an in-flight save counts as saved
        first, directory = step - self.streak + 1, self.checkpointer.directory
        latest = self.checkpointer.latest_step()
        if latest is None:
            resume = "No checkpoint was saved: start over with a lower optim.lr or optim.grad_clip"
        else:
            resume = (
                f"The newest checkpoint, {directory}/{latest}, holds the state before them: "
                "rerun the same command with a lower --config.optim.lr or with "
                f"--config.optim.grad_clip to resume from it (if it fails again, move {latest} "
                f"out of {directory} to resume from the checkpoint before it)"
            )
        return (
            f"{self.streak} consecutive steps had a non-finite loss or gradient norm (steps "
            f"{first}-{step}; last: loss={row['loss']}, grad_norm={row['grad_norm']}); their "
            f"updates were skipped and no checkpoint was saved during them. {resume}, or "
            f"inspect the data near step {first}"
        )

    def _checkpoint(self, step: int, state: TrainState) -> bool:
        """Save now unless inside a non-finite streak (whose state would resume into it);
        returns whether the save is done (False: retry at the next step)."""
        if self.streak:
            if self.postponed_at is None:
                log.warning("step %d: checkpoint postponed: the step was not finite", step)
                self.postponed_at = step
            return False
        if self.postponed_at is not None:
            log.info(
                "step %d: finite again; saving the checkpoint due at %d", step, self.postponed_at
            )
            self.postponed_at = None
        self.checkpointer.save(step, state, self.data, self.cfg, force=True)
        return True

    def _log(self, step: int, elapsed: float, steps: int, bar: tqdm) -> None:
        summary = self.window.summary()
        summary["step_time_s"] = elapsed / steps
        summary["examples_per_s"] = self.cfg.data.batch_size * steps / elapsed
        self.writer.write(step, summary)
        self.results.update(summary)
        if bar.disable:
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in summary.items()))
        else:
            bar.set_postfix(loss=f"{summary['loss']:.4g}", refresh=False)

    def evaluate(self, state: TrainState, step: int) -> None:
        key = eval_key(self.cfg.seed)
        rows = []
        batches = self._eval_iterator(self.cfg.data.eval_split, drop_remainder=True)
        for _, batch in zip(range(self.cfg.train.eval_batches), batches):
            batch = shard_batch(batch, self.setup.mesh, self.setup.rules)
            rows.append(self.eval_step(state.params, batch, self.rest, key))
        rows = jax.device_get(rows)
        means = {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]}
        self.writer.write(step, means)
        self.results.update(means)

    def report(self, report_fn: ReportFn, state: TrainState, step: int) -> None:
        """Run the end-of-run report on every process (it may run sharded computations); only
        process 0 writes its metrics."""
        model = model_from(self.setup, state.params, self.rest)
        key = eval_key(self.cfg.seed)
        values = report_fn(model, self.cfg, self._eval_iterator, key, str(self.run_dir))
        values = {f"report/{k}": float(v) for k, v in values.items()}
        self.writer.write(step, values)
        self.results.update(values)

    def train(self, state: TrainState, sigterm: _SigtermFlag) -> tuple[TrainState, bool]:
        """Run to `train.steps`; returns (state, stopped early by a preemption)."""
        train_cfg = self.cfg.train
        step = start = int(state.step)
        show_bar = jax.process_index() == 0 and (
            train_cfg.progress_bar == "on"
            or (train_cfg.progress_bar == "auto" and sys.stdout.isatty())
        )
        bar = tqdm(total=train_cfg.steps, initial=start, disable=not show_bar, dynamic_ncols=True)
        window_start, window_time = step, time.perf_counter()
        sigterm.phase = "train"
        stop = sigterm.requested  # SIGTERM during setup: no step, nothing new to save
        save_due = False  # a checkpoint postponed by a non-finite streak
        while step < train_cfg.steps and not stop:
            try:
                batch = next(self.data)
            except StopIteration:
                raise RuntimeError(
                    f"the training data ran out at step {step}; the train iterator must repeat "
                    "(make_iterator with num_epochs=None)"
                ) from None
            state, metrics = self.train_step(
                state, shard_batch(batch, self.setup.mesh, self.setup.rules), self.rest
            )
            step += 1
            # Fetch the previous step's metrics while this one runs (no per-step stall).
            self._fetch()
            self.pending.append((step, metrics))
            bar.update()
            stop = sigterm.requested or self.checkpointer.reached_preemption(step)
            is_log = step % train_cfg.log_every == 0 or step == train_cfg.steps or stop
            is_eval = train_cfg.eval_every and step % train_cfg.eval_every == 0
            is_ckpt = train_cfg.ckpt_every and step % train_cfg.ckpt_every == 0
            save_due = save_due or is_ckpt or stop or step == train_cfg.steps
            if is_log or is_eval or save_due:
                # Also: no checkpoint holds a state past the limit or inside a streak.
                self._fetch()
            if is_log:
                now = time.perf_counter()
                self._log(step, now - window_time, step - window_start, bar)
                window_start, window_time = step, now
            if is_eval:
                self.evaluate(state, step)
            if save_due:
                save_due = not self._checkpoint(step, state)
        bar.close()
        self._fetch()
        return state, stop


def train(
    config: ConfigDict,
    run_dir: str | Path | None = None,
    *,
    make_iterator: IteratorFactory | None = None,
    build_model: ModelBuilder | None = None,
    report: ReportFn | None = None,
    weight_sources: Sequence[WeightSource] | None = None,
) -> dict[str, Any]:
    """Train `config` in `run_dir` (default `config.run_dir`), resuming from its newest
    checkpoint if there is one, then run the end-of-run `report` (unless preempted).

    `make_iterator` defaults to `pretzel_jax.data.make_iterator`, or `make_stage_iterator` when
    `config.data` names a curriculum `stage`; `build_model` to
    `pretzel_jax.models.build`, in which case `report` defaults to
    `pretzel_jax.models.report_fn(config)` and `weight_sources` to
    `pretzel_jax.models.weight_sources(config)` (where the registry has it; else none).
    `weight_sources` (`pretzel_jax.train.weights.WeightSource`) are loaded into the sharded
    state after init. Returns the last logged metrics (train, `eval/`, `report/`) with `step`
    and `preempted`."""
    run_dir = run_dir or config.run_dir
    if not run_dir:
        raise ConfigError("run_dir is empty; pass --run_dir or set config.run_dir")
    run_dir = Path(run_dir)
    validate(config)
    config = config.copy_and_resolve_references()
    config.run_dir = str(run_dir)
    config.lock()
    # Resolved here so that train/ imports no model or data code at import time.
    if make_iterator is None:
        from pretzel_jax.data import make_iterator, make_stage_iterator

        if "stage" in config.data:  # a curriculum stage pipeline (packed sequences)
            make_iterator = make_stage_iterator
    if build_model is None:
        from pretzel_jax import models

        if weight_sources is None:
            registered = getattr(models, "weight_sources", None)
            weight_sources = registered(config) if registered is not None else ()
        build_model, report = models.build, report or models.report_fn(config)
    weight_sources = tuple(weight_sources or ())

    with _SigtermFlag() as sigterm:
        return _session(
            config, run_dir, make_iterator, build_model, report, weight_sources, sigterm
        )


def _session(
    config: ConfigDict,
    run_dir: Path,
    make_iterator: IteratorFactory,
    build_model: ModelBuilder,
    report: ReportFn | None,
    weight_sources: tuple[WeightSource, ...],
    sigterm: _SigtermFlag,
) -> dict[str, Any]:
    """`train` after its arguments are resolved, under the SIGTERM flag."""
    is_main = jax.process_index() == 0
    setup = build_setup(config, make_mesh(config.mesh), build_model)
    check_sources(weight_sources, setup.all_params, setup.policy.trainable)
    policy = describe_param_policy(setup.all_params, config.optim)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
        (run_dir / "param_policy.txt").write_text(policy + "\n")
    log.info(
        "mesh %s; %s (table: %s)",
        dict(setup.mesh.shape),
        policy.splitlines()[-1],
        run_dir / "param_policy.txt",
    )

    for source in weight_sources:
        log.info("weights %r (%s) from %s", source.prefix, source.role, source.path)

    train_cfg = config.train
    checkpointer = Checkpointer(
        run_dir / "checkpoints",
        every=train_cfg.ckpt_every,
        keep=train_cfg.keep_checkpoints,
        async_save=train_cfg.async_checkpoint,
        weight_sources=source_records(weight_sources),
    )
    run = None
    try:
        run = _Run(setup, run_dir, make_iterator, checkpointer, weight_sources)
        state = run.restore_or_init()
        run.writer = MetricsWriter(run_dir, enabled=is_main, start_step=int(state.step))
        state, preempted = run.train(state, sigterm)
        checkpointer.close()  # the final checkpoint is complete before the report or return
        step = int(state.step)
        preempted = preempted or sigterm.requested  # also: SIGTERM after the last step
        if not preempted and report is not None:
            try:
                sigterm.phase = "report"
                run.report(report, state, step)
            except _ReportStopped:
                preempted = True
            finally:
                sigterm.phase = "end"
        if preempted:
            log.warning("stopped at step %d; rerun the same command to resume", step)
        return {"step": step, "preempted": preempted, **run.results}
    finally:
        checkpointer.close()
        if run is not None and run.writer is not None:
            run.writer.close()
