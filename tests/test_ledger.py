"""ablations/ledger.py: a sweep's parts and sessions, pure file bookkeeping through its storage."""
from __future__ import annotations

import json

from ablations.ledger import Ledger, earlier_wall, part_of, session_of
from tune.storage import Storage


def test_a_resumed_session_adds_the_wall_time_of_an_interrupted_one(tmp_path):
    """A sweep stopped mid-way still books its wall time (zoo included), and the resumed
    invocation's table adds it."""
    ledger = Ledger(Storage.open(tmp_path), "sweep-digits-ipc1-smoke")
    assert not ledger.exists()
    first = ledger.start_session(False, "first")
    ledger.end_session(first, 12.5)  # the `finally` of an interrupted invocation
    second = ledger.start_session(True, "second")
    assert earlier_wall(second) == 12.5
    ledger.end_session(second, 1.0)
    written = json.loads((tmp_path / "sweep-digits-ipc1-smoke.sessions.json").read_text())
    assert [s["command"] for s in written] == ["first", "second"] and [s["wall_s"] for s in written] == [12.5, 1.0]
    assert ledger.start_session(False, "fresh")[0]["session"] == 1  # without --resume: a new ledger


def test_parts_add_new_seeds_and_never_drop_any(tmp_path):
    ledger = Ledger(Storage.open(tmp_path), "s")
    assert ledger.parts([0, 1], resume=False) == [{"folder": "s", "seeds": [0, 1]}]
    parts = ledger.parts([0, 2, 3], resume=True)
    assert parts == [{"folder": "s", "seeds": [0, 1]}, {"folder": "s.seeds2-3", "seeds": [2, 3]}]
    assert ledger.parts([0], resume=True) == parts  # fewer seeds asked: nothing dropped
    assert json.loads((tmp_path / "s.parts.json").read_text()) == parts
    assert part_of(parts, 3) == "s.seeds2-3" and part_of(parts, 9) == ""


def test_session_of_credits_the_invocation_that_ran_the_trial():
    # measured: the first invocation ended 0.46 s before the resume started, and Tune stamped the
    # last trial's report 518 (whole seconds): it belongs to the first, not to the resume
    ledger = [{"session": 1, "started": 469.94, "wall_s": 48.25}, {"session": 2, "started": 518.65, "wall_s": 0.27}]
    assert [session_of(ledger, t) for t in (470, 507, 518)] == [1, 1, 1]
    assert session_of(ledger, None) is None
    # spans without wall_s end where the next invocation starts; a later trial goes to the later one
    old = [{"session": 1, "started": 100.0}, {"session": 2, "started": 200.0}, {"session": 3, "started": 300.0}]
    assert [session_of(old, t) for t in (150, 250, 900)] == [1, 2, 3]
