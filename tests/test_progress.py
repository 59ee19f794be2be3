"""Progress events, and the stop a signal handler leaves for the next event."""
from __future__ import annotations

import pytest

from igpt_cli import progress
from igpt_cli.progress import Reporter


def test_reporter_emits_absolute_counts_and_start():
    events = []
    rep = Reporter(events.append, "extract", total=10, unit="image")
    rep.start()
    rep.advance(4)
    rep.log("resuming")
    assert [(e.done, e.started, e.message) for e in events] == [(0, True, ""), (4, False, ""), (4, False, "resuming")]


def test_a_swallowed_signal_is_raised_at_the_next_event_once():
    class Stop(KeyboardInterrupt):
        pass

    rep = Reporter(None, "quantize", total=3)  # quiet runs check too
    progress.request_stop(Stop)
    with pytest.raises(Stop):
        rep.advance(1)
    rep.advance(1)  # raised once, then cleared
    progress.request_stop(Stop)
    progress.clear_stop()  # the handler's own exception arrived: nothing left to raise
    rep.advance(1)
    assert rep.done == 3
