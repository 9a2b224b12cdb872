"""Metric windows and writers (TensorBoard + `run_dir/metrics.jsonl`), process 0 only.

Train metrics are averaged over the steps between two log points (skipped steps excluded, since
their loss is not finite) and written unprefixed (`loss`, `bits_per_dim`, ...); eval and report
metrics carry an `eval/` or `report/` prefix.

A resumed run logs each step once: rows past the restored step, rows cut short by a kill, and the
report row of an earlier finish are dropped from metrics.jsonl (rewritten atomically), and
TensorBoard is told to purge its events past the restored step (`purge_step`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from tensorboardX import SummaryWriter

log = logging.getLogger(__name__)

# Step metrics that are not averaged over a window: counters keep their last value.
_LAST = ("nonfinite_consecutive", "nonfinite_total")


class MetricsWindow:
    """Per-step host metrics collected between two log points."""

    def __init__(self) -> None:
        self._rows: list[dict[str, float]] = []

    def add(self, metrics: Mapping[str, float]) -> None:
        self._rows.append(dict(metrics))

    def summary(self) -> dict[str, float]:
        """Means over the applied steps, `skipped` = number of skipped steps; then resets."""
        rows, self._rows = self._rows, []
        if not rows:
            return {}
        applied = [r for r in rows if not r["skipped"]]
        out = {}
        for key in rows[0]:
            if key in _LAST:
                out[key] = rows[-1][key]
            elif key == "skipped":
                out[key] = float(sum(r[key] for r in rows))
            else:
                out[key] = float(np.mean([r[key] for r in applied])) if applied else math.nan
        return out


class MetricsWriter:
    """Appends one JSON object per `write` to metrics.jsonl and mirrors it to TensorBoard.
    `start_step`: the step training starts from (earlier logs past it are dropped)."""

    def __init__(self, run_dir: Path, *, enabled: bool, start_step: int = 0):
        self.enabled = enabled
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            path = run_dir / "metrics.jsonl"
            dropped = drop_rows_after(path, start_step)
            if dropped:
                log.info("%s: dropped %d rows logged after step %d", path, dropped, start_step)
            self._jsonl = open(path, "a")  # noqa: SIM115 (closed in close())
            tb_dir = run_dir / "tensorboard"
            purge = start_step + 1 if tb_dir.exists() else None
            # tensorboardX names its file by the second and opens it "wb": a second writer in
            # the same second (a quick resume) would truncate the first's events. The suffix
            # keeps names unique and in start order.
            suffix = f".{time.time_ns()}"
            self._tb = SummaryWriter(str(tb_dir), purge_step=purge, filename_suffix=suffix)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        # JSON has no NaN/Inf: write them as null.
        row = {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self._jsonl.flush()
        for key, value in row.items():
            if value is not None:
                self._tb.add_scalar(key if "/" in key else f"train/{key}", value, step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Drop the rows of a metrics.jsonl past `step`, report rows and unreadable lines (a write
    cut by a kill); rewrites the file atomically. Returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            keep = row["step"] <= step and not any(k.startswith("report/") for k in row)
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    return dropped
