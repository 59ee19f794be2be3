"""Training you can watch: `OUT/metrics.jsonl`, `OUT/loss.png` and TensorBoard event files.

`RunLog` is written by rank 0 only. `metrics.jsonl` holds one JSON object per logged step
(`step`, `loss`: the mean training loss since the previous line, `lr`, `tokens_per_s`, and
`val_loss` / `val_bits_per_dim` where the run evaluated); it is appended line by line and
flushed, so `tail -f` follows it. A run that starts at step s (0 for a new run, the
checkpoint's step for `--resume`) first drops every line past s (and a line a kill cut
short), so the file never holds a step twice. `loss.png` is redrawn from the records at each
evaluation (written under a temporary name and renamed) by the drawer the caller passes
(`pretrain(draw_loss=)`; the CLI's matplotlib one: library code never draws). TensorBoard
event files go to `OUT/tensorboard/` when the `tensorboard` package is importable (the
`tensorboard` extra); nothing is written, and nothing is said, otherwise.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO, Callable

from .state import LOSS_PLOT, METRICS_FILE, TENSORBOARD_DIR, replace_file, write_text


# draws the loss curves of metrics records as a PNG into a binary file (the CLI's matplotlib
# `plots.write_loss_plot`: the library itself never draws)
DrawLoss = Callable[[list, BinaryIO], None]


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics file, skipping a line cut short (a kill while it was appended)."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            records.append(rec)
    return records


def is_run_log(path: Path, head: int = 1 << 16) -> bool:
    """Whether `path` is a metrics file a run wrote: a regular file whose lines (the first `head`
    bytes of them; a last line cut short by a kill allowed) are each a JSON record with an
    integer `step`. A new run may start its log anew over one; any other file is a user's."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:
        return False
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        lines = fh.read(head).splitlines()
    records = 0
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and records:
                continue
            return False
        if not (isinstance(rec, dict) and isinstance(rec.get("step"), int) and not isinstance(rec["step"], bool)):
            return False
        records += 1
    return records > 0


def _tensorboard_writer(log_dir: Path, start_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # the tensorboard package is an optional extra
        return None
    # purge_step: events of an earlier attempt past the resumed step are hidden, as in metrics.jsonl
    return SummaryWriter(str(log_dir), purge_step=start_step or None)


class RunLog:
    """The watchable logs of a run directory, from `start_step` on."""

    def __init__(self, out: Path, start_step: int, draw_loss: DrawLoss | None = None):
        self.draw_loss = draw_loss
        self.metrics = Path(out) / METRICS_FILE
        self.plot = Path(out) / LOSS_PLOT
        kept = [r for r in read_metrics(self.metrics) if r["step"] <= start_step]
        if self.metrics.exists() or kept:
            write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))
        self.records = kept
        self.tb = _tensorboard_writer(Path(out) / TENSORBOARD_DIR, start_step)

    def log(self, record: dict) -> None:
        """Append one step's record (and its scalars to TensorBoard)."""
        with open(self.metrics, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        self.records.append(record)
        if self.tb is not None:
            for key in ("loss", "val_loss", "lr", "tokens_per_s"):
                if record.get(key) is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", record[key],
                                       record["step"])
            self.tb.flush()

    def draw(self) -> None:
        """Redraw `loss.png` from every record so far, when the run was given a drawer."""
        if self.draw_loss is not None:
            replace_file(self.plot, lambda fh: self.draw_loss(self.records, fh))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None

