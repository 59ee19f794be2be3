"""The one kind of progress callback every stage takes.

Library code never draws: a long-running function takes `on_progress`, a callable
receiving `ProgressEvent`s, and calls it as work advances. The CLI turns events into
its single progress bar on stderr (`igpt_cli.cli.ui`); Python users may log them,
feed a notebook widget, or pass nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class ProgressEvent:
    task: str                  # what runs: "quantize", "extract", "probe", "train", …
    done: int                  # units finished so far (absolute, not an increment)
    total: Optional[int]       # units in all; None while unknown
    unit: str = "item"         # "image", "layer", "step"
    info: str = ""             # short status to show beside the bar ("loss 2.31 nats")
    message: str = ""          # a line worth logging ("resuming at row 512 of 3000")
    result: Any = None         # a partial result, e.g. a probe's finished LayerResult
    started: bool = False      # True on the first event of a run (`Reporter.start`): a new bar


OnProgress = Callable[[ProgressEvent], None]

# A stop asked for by a signal handler (Ctrl-C, SIGTERM). The handler raises at once, but an
# exception raised inside a signal handler can land in a place that swallows it (a weakref
# callback, a __del__): the request stays set, and the next progress event raises it, so a
# run never finishes as if nothing had happened.
_stop_requested: Optional[type] = None


def request_stop(exc_type: type = KeyboardInterrupt) -> None:
    global _stop_requested
    _stop_requested = exc_type


def clear_stop() -> None:
    global _stop_requested
    _stop_requested = None


def check_stop() -> None:
    """Raise (once) the stop a signal handler asked for, if any: called at every progress event."""
    global _stop_requested
    if _stop_requested is not None:
        exc, _stop_requested = _stop_requested, None
        raise exc()


class Reporter:
    """A stage's helper for emitting events: `rep = Reporter(on_progress, "extract", total, "image")`,
    then `rep.advance(k)`, `rep.log("…")`. A no-op when `on_progress` is None."""

    def __init__(self, on_progress: Optional[OnProgress], task: str, total: Optional[int] = None,
                 unit: str = "item", done: int = 0):
        self.on_progress, self.task, self.total, self.unit, self.done = on_progress, task, total, unit, done

    def emit(self, *, info: str = "", message: str = "", result: Any = None, started: bool = False) -> None:
        check_stop()
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(self.task, self.done, self.total, self.unit, info, message, result,
                                           started))

    def start(self, total: Optional[int] = None, done: int | None = None) -> None:
        if total is not None:
            self.total = total
        if done is not None:
            self.done = done
        self.emit(started=True)

    def advance(self, k: int = 1, *, info: str = "", result: Any = None) -> None:
        self.done += k
        self.emit(info=info, result=result)

    def log(self, message: str) -> None:
        self.emit(message=message)
