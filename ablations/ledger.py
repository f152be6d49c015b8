"""A sweep's bookkeeping beside its Tune folder: its parts (`--resume --seeds`) and its sessions.

Pure file bookkeeping through the experiment's storage (a folder or a bucket), no Ray:
`<sweep>.parts.json` lists the Tune runs that make up the sweep, `<sweep>.sessions.json` the
invocations that worked on it (their start and wall time).
"""
from __future__ import annotations

import contextlib
import json
import math
import time

from tune.storage import Storage


class Ledger:
    def __init__(self, storage: Storage, name: str):
        self.storage, self.name = storage, name

    @property
    def parts_file(self) -> str:
        return f"{self.name}.parts.json"

    @property
    def sessions_file(self) -> str:
        return f"{self.name}.sessions.json"

    def exists(self) -> bool:
        """A session ledger exists once an invocation got past the checks, so `--resume` can restart
        a sweep stopped before Tune saved anything."""
        return self.storage.exists(self.sessions_file)

    def _read(self, file: str):
        return json.loads(self.storage.read_text(file))

    def _write(self, file: str, value) -> None:
        self.storage.write_text(json.dumps(value, indent=1), file)

    # --- parts ----------------------------------------------------------------------------------
    def parts(self, seeds: list[int], resume: bool) -> list[dict]:
        """The sweep's Tune runs ("parts"), each every cell x its seeds. Tune cannot add grid points
        to a restored run, so a resume whose --seeds names seeds the sweep lacks adds a part for those
        (Tune folder `<sweep>.seeds<a>-<b>`) and the finished ones are kept, not re-run. Listed in
        `<sweep>.parts.json`, written before a part starts; a resume never drops seeds."""
        from ray import tune

        listed = self.storage.exists(self.parts_file)
        parts: list[dict] = []
        if resume and listed:
            parts = self._read(self.parts_file)
        elif resume and tune.Tuner.can_restore(self.storage.uri(self.name)):  # from before parts were listed
            ran = sorted({int(t.config["seed"]) for t in tune.ExperimentAnalysis(self.storage.uri(self.name)).trials})
            parts = [{"folder": self.name, "seeds": ran}]
        have = {s for part in parts for s in part["seeds"]}
        new = [s for s in seeds if s not in have]
        if new:
            folder = f"{self.name}.seeds{'-'.join(map(str, new))}" if parts else self.name
            parts.append({"folder": folder, "seeds": new})
        if new or not listed:
            self._write(self.parts_file, parts)
        return parts

    # --- sessions -------------------------------------------------------------------------------
    def start_session(self, resume: bool, command: str) -> list[dict]:
        """Append this invocation to the session ledger; returns every session so far."""
        sessions = []
        if resume:
            with contextlib.suppress(OSError, ValueError):
                sessions = list(self._read(self.sessions_file))
        sessions.append({"session": len(sessions) + 1, "started": time.time(), "command": command})
        self._write(self.sessions_file, sessions)
        return sessions

    def end_session(self, sessions: list[dict], wall_s: float) -> None:
        """Record this invocation's wall time, so a sweep resumed across sessions reports the sum
        (an invocation killed without its `finally` counts 0: the table's wall is then low)."""
        sessions[-1]["wall_s"] = wall_s
        self._write(self.sessions_file, sessions)


def part_of(parts: list[dict], seed) -> str:
    """The Tune folder that ran a seed's trials."""
    return next((p["folder"] for p in parts if int(seed) in p["seeds"]), "")


def earlier_wall(sessions: list[dict]) -> float:
    """Wall time of the invocations before this one (their zoo, trials), so a resumed table adds it."""
    return sum(float(s.get("wall_s", 0.0)) for s in sessions[:-1])


def session_of(sessions: list[dict], finished: float | None) -> int | None:
    """The invocation during which a trial sent its last report. Tune stamps it in whole seconds
    (the report came at t in [finished, finished + 1)), so an invocation started less than a second
    after the previous one ended could also match: the earliest invocation whose span holds t
    wins. A span ends at started + wall_s, or where the next invocation starts when the ledger has
    no wall_s (an invocation killed before its `finally`, or one from before `end_session`)."""
    if finished is None or finished != finished:
        return None
    t = float(finished)
    for i, s in enumerate(sessions):
        nxt = sessions[i + 1]["started"] if i + 1 < len(sessions) else math.inf
        end = s["started"] + float(s["wall_s"]) if "wall_s" in s else nxt
        if s["started"] < t + 1 and t <= end:
            return s["session"]
    started = [s["session"] for s in sessions if s["started"] < t + 1]
    return max(started) if started else sessions[0]["session"]
