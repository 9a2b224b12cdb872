"""Orbax checkpoints of the train state, the data iterator position and the config.

Each step directory holds three items: `state` (the sharded TrainState: trainable parameters and
optimizer state, restored straight into the abstract target's shardings), `data` (the Grain
iterator state, one file per process) and `config` (JSON: the config, the step, the shape/dtype
of every state leaf, and every weight source's prefix, role, path and content hash). The last one
lets a restore fail with a clear message before touching any array when the model, the optimizer
policy or a frozen weight file changed. Frozen parameters are never written: they are rebuilt
from their weight sources at every start.

The metadata also holds a checksum of every state array (`pretzel_jax.train.integrity`), taken
at save and checked after a restore; a state holding a NaN or an infinity is never saved. A
damaged checkpoint (incomplete, unreadable, or failing a checksum) is refused with one line
naming it, moved intact to `refused_checkpoints/` beside the checkpoint folder, and the restore
falls back to the newest checkpoint that passes.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from pretzel_jax.train import integrity
from pretzel_jax.train.errors import CheckpointError
from pretzel_jax.train.state import TrainState

log = logging.getLogger(__name__)

ITEMS = ("state", "data", "config")
REFUSED = "refused_checkpoints"  # beside the checkpoint folder: damaged checkpoints, kept intact


class DamagedCheckpoint(CheckpointError):
    """A checkpoint whose files are incomplete, unreadable or fail their checksums (a restore
    falls back past it), as opposed to one from a different model or config (it does not)."""


def _short(e: BaseException, limit: int = 240) -> str:
    """`Type: message` of an exception on one line. TensorStore errors run to 60 lines of
    specs after a chain of contexts whose innermost (the file and the cause) comes last: the
    specs are cut and the tail kept."""
    text = " ".join(str(e).split("[tensorstore_spec")[0].split())
    if len(text) > limit:
        text = "..." + text[-limit:]
    return f"{type(e).__name__}: {text}"


def _drop_closed_loop_noise() -> None:
    """When an Orbax restore fails, TensorStore callbacks still pending fire into Orbax's closed
    asyncio loop, each printing a traceback ("Event loop is closed") that says nothing about the
    checkpoint. Drop those (process-wide, installed once); pass every other one on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_noise", False):
        return

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_noise = True
    sys.unraisablehook = hook


def state_signature(state: Any) -> dict[str, list]:
    """{leaf path: [shape, dtype]} of a (possibly abstract) train state."""
    return {
        jax.tree_util.keystr(path): [list(leaf.shape), str(leaf.dtype)]
        for path, leaf in jax.tree_util.tree_leaves_with_path(state)
    }


def _fmt(signature: list) -> str:
    shape, dtype = signature
    return f"{dtype}{list(shape)}"


def _diff(saved: dict[str, list], expected: dict[str, list], limit: int = 4) -> str:
    groups = {
        "not in checkpoint": [k for k in expected if k not in saved],
        "only in checkpoint": [k for k in saved if k not in expected],
        "shape/dtype changed": [
            f"{k} {_fmt(saved[k])} -> {_fmt(v)}"
            for k, v in expected.items()
            if saved.get(k, v) != v
        ],
    }
    return "; ".join(
        f"{label}: {', '.join(items[:limit])}{', ...' if len(items) > limit else ''}"
        for label, items in groups.items()
        if items
    )


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The handler of the `state` item (the format StandardSave writes). A single process saves
    without replica parallelism: it writes every shard itself either way, and splitting each
    replicated array over its replicas compiles a slice program per array shape and replica
    (3.4 s of a 13.6 s stage-0 smoke run on 2 cores). Multi-process runs keep orbax's default
    (on, except on GPU), which spreads the writes over the hosts."""
    default = ocp.type_handlers.get_type_handler(jax.Array)
    arrays = ocp.type_handlers.ArrayHandler(
        use_replica_parallel=None if jax.process_count() > 1 else False,
        # The default handler's store of per-array metadata, so the files stay the same.
        array_metadata_store=getattr(default, "_array_metadata_store", None),
    )
    others = [t for t in ocp.type_handlers.supported_types() if t is not jax.Array]
    registry = ocp.type_handlers.create_type_handler_registry(
        *[(t, ocp.type_handlers.get_type_handler(t)) for t in others], (jax.Array, arrays)
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _weight_problems(saved: Sequence[Mapping], current: Sequence[Mapping]) -> list[str]:
    """Differences between the "frozen" weight sources a checkpoint was trained with and this
    run's (`pretzel_jax.train.weights.source_records`); "init" sources do not matter on resume."""
    saved_frozen = {r["prefix"]: r for r in saved if r.get("role") == "frozen"}
    now_frozen = {r["prefix"]: r for r in current if r["role"] == "frozen"}
    problems = []
    for prefix, now in now_frozen.items():
        then = saved_frozen.get(prefix)
        if then is None:
            problems.append(
                f"the config loads the frozen parameters under {prefix!r} from {now['path']}, "
                "but the checkpoint was trained without that weight source (remove it from the "
                "config to resume)"
            )
        elif now["sha256"] is None:
            problems.append(
                f"frozen weights {now['path']} (prefix {prefix!r}) do not exist; the checkpoint "
                f"was trained with {then['path']} ({then['sha256']}): point the config at that "
                "file"
            )
        elif now["sha256"] != then["sha256"]:
            problems.append(
                f"frozen weights {now['path']} (prefix {prefix!r}) have content hash "
                f"{now['sha256']}, but the checkpoint was trained with {then['path']} of hash "
                f"{then['sha256']}: point the config at the original file"
            )
    for prefix, then in saved_frozen.items():
        if prefix not in now_frozen:
            problems.append(
                f"the checkpoint was trained with the frozen parameters under {prefix!r} loaded "
                f"from {then['path']} ({then['sha256']}), but the config has no weight source "
                "for them: add it back"
            )
    return problems


class Checkpointer:
    """Saves every `every` steps (and when forced), keeps the newest `keep`, restores exactly.

    `weight_sources`: the records (`pretzel_jax.train.weights.source_records`) written into every
    checkpoint's `config` item and compared on restore."""

    def __init__(
        self,
        directory: Path,
        *,
        every: int,
        keep: int,
        async_save: bool,
        weight_sources: Sequence[Mapping] = (),
    ):
        self.directory = Path(directory).absolute()
        self.every = every
        self.weight_sources = [dict(r) for r in weight_sources]
        self._closed = False
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True
            ),
            item_handlers={
                "state": _state_handler(),
                "data": grain.checkpoint.CheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, state: TrainState, data_iter: Any, config: ConfigDict, *, force=False
    ) -> bool:
        """Save if `step` is on the `every` grid or `force`; returns whether it saved. A state
        holding a NaN or an infinity is not saved (a warning names its arrays)."""
        if step == self.latest_step() or not (force or (self.every and step % self.every == 0)):
            return False
        checksums, nonfinite = integrity.inspect(state)
        if nonfinite:
            log.warning(
                "step %d not checkpointed: non-finite values in %s", step, ", ".join(nonfinite[:4])
            )
            return False
        meta = {
            "step": step,
            "config": json.loads(config.to_json_best_effort()),
            "state_signature": state_signature(state),
            "weight_sources": self.weight_sources,
            "checksums": checksums,
        }
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=grain.checkpoint.CheckpointSave(data_iter),
                config=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore_latest(self, abstract: TrainState, data_iter: Any) -> TrainState | None:
        """The newest checkpoint that passes its checks (`restore`), or None when there is none.
        Damaged newer ones are moved to `refused_checkpoints/` (one warning each); when every
        checkpoint is damaged, raises CheckpointError and moves nothing."""
        refused: list[tuple[int, DamagedCheckpoint]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self.restore(step, abstract, data_iter)
            except DamagedCheckpoint as e:
                refused.append((step, e))
                continue
            for bad, reason in refused:
                aside = self._set_aside(bad)
                log.warning("%s; moved it to %s and resumed from step %d", reason, aside, step)
            return state
        if refused:
            first = str(refused[0][1])
            older = f" (and {len(refused) - 1} older ones)" if len(refused) > 1 else ""
            raise CheckpointError(
                f"no checkpoint can be restored: {first}{older}. Pass a fresh --run_dir to start "
                f"over; {self.directory} is left as it is"
            )
        return None

    def _set_aside(self, step: int) -> Path:
        """Move a refused step directory to `refused_checkpoints/` (never deleted)."""
        target = self.directory.parent / REFUSED / str(step)
        n = 0
        while target.exists():
            n += 1
            target = target.with_name(f"{step}.{n}")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"refused checkpoint {step}")
        self._manager.reload()
        return target

    def restore(self, step: int, abstract: TrainState, data_iter: Any) -> TrainState:
        """The state saved at `step`, in `abstract`'s shardings; moves `data_iter` to the saved
        position. Raises DamagedCheckpoint (one line naming the step directory) when a file is
        missing, unreadable or fails its checksum, and CheckpointError naming the fix, before
        reading any array, when the state's structure or a frozen weight file differs."""
        path = self.directory / str(step)
        missing = [item for item in ITEMS if not (path / item).is_dir()]
        if missing:
            raise DamagedCheckpoint(f"checkpoint {path} is incomplete (no {missing})")
        try:
            args = ocp.args.Composite(config=ocp.args.JsonRestore())
            meta = self._manager.restore(step, args=args)["config"]
            saved = meta["state_signature"]
            saved_weights = meta.get("weight_sources", [])
        except Exception as e:
            log.debug("reading %s/config failed", path, exc_info=e)
            raise DamagedCheckpoint(
                f"checkpoint {path} has unreadable metadata ({_short(e)})"
            ) from e
        problems = _weight_problems(saved_weights, self.weight_sources)
        if problems:
            raise CheckpointError(
                f"checkpoint {path} does not match this run's frozen weights:\n  "
                + "\n  ".join(problems)
                + "\nFrozen weights are not stored in checkpoints; resuming needs the files "
                f"the run was trained with (see {path / 'config'}). Otherwise start a new run "
                "dir (--run_dir) to train with the new weights from the start"
            )
        diff = _diff(saved, state_signature(abstract))
        if diff:
            raise CheckpointError(
                f"checkpoint {path} holds a different train state than this config builds "
                f"({diff}). Resume with the config it was saved with (see {path / 'config'}), "
                "or pass a fresh --run_dir"
            )
        _drop_closed_loop_noise()
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(
                        abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)
                    ),
                    data=grain.checkpoint.CheckpointRestore(data_iter),
                ),
            )
        except Exception as e:
            # The full TensorStore message (tens of lines) goes to the debug log only.
            log.debug("reading %s failed", path, exc_info=e)
            raise DamagedCheckpoint(f"checkpoint {path} is corrupt or partial ({_short(e)})") from e
        state = restored["state"]
        if "checksums" not in meta:
            log.warning("checkpoint %s has no checksums (an older format): not verified", path)
            return state
        bad = integrity.mismatches(meta["checksums"], integrity.inspect(state)[0])
        if bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            raise DamagedCheckpoint(
                f"checkpoint {path} fails its checksum in array {', '.join(bad[:3])}{more} "
                f"(files under {path / 'state'})"
            )
        return state

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any process got a preemption notice (multi-host only;
        a single process handles SIGTERM itself)."""
        return jax.process_count() > 1 and self._manager.reached_preemption(step)

    def wait(self) -> None:
        """Wait for in-flight async saves."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for in-flight async saves, then release the manager (idempotent)."""
        if not self._closed:
            self._manager.wait_until_finished()
            self._manager.close()
            self._closed = True
