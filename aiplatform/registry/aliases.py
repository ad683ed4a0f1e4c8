"""Alias moves as a log: who moved which alias where, and what they expected to replace.

The registry appends one row per requested move (``alias_moves``) and decides every question
about aliases by replaying those rows in commit order (``replay``): the current target, the
history of applied moves, the line of versions that ``rollback`` walks back, and which moves
lost a compare-and-set race. Kept apart from ``registry.py`` because it is pure: rows in,
answers out, no storage.
"""

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from aiplatform.core.settings import default_actor  # noqa: F401  (re-exported)

MOVES_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("alias", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("set_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("actor", pa.string(), nullable=False),
        pa.field("move_id", pa.string(), nullable=False),
        pa.field("expected_version", pa.int64(), nullable=True),
        pa.field("checked", pa.bool_(), nullable=False),
    ]
)

def utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


class _Unchecked:
    """The ``expected`` of a move that applies whatever the alias points at."""

    def __repr__(self) -> str:
        return "UNCHECKED"


UNCHECKED: Any = _Unchecked()


@dataclass
class AliasState:
    """One alias after replaying its moves: the applied moves and its line of versions."""

    history: list[dict[str, Any]] = field(default_factory=list)
    line: list[int] = field(default_factory=list)

    @property
    def target(self) -> int | None:
        return self.history[-1]["version"] if self.history else None


def replay(rows: list[dict[str, Any]]) -> tuple[dict[str, AliasState], dict[str, dict[str, Any] | None]]:
    """Replay alias moves given in commit order (module docstring, "Alias moves").

    Returns each alias's state and, for every rejected move, the applied move it lost to (the
    one that set the target it found; None when the alias was not set). The line of versions
    is what ``rollback`` walks back: a move to the version just below the top of the line
    (a rollback, or a promotion of that version) steps back along it, any other move to a
    new version extends it.
    """
    states: dict[str, AliasState] = {}
    rejected: dict[str, dict[str, Any] | None] = {}
    for r in rows:
        state = states.setdefault(r["alias"], AliasState())
        current = state.target
        if r.get("checked") and r.get("expected_version") != current:
            rejected[r["move_id"]] = state.history[-1] if state.history else None
            continue
        version = int(r["version"])
        state.history.append({
            "version": version, "previous": current, "set_at": utc(r["set_at"]),
            "reason": r["reason"], "actor": r.get("actor") or "", "move_id": r.get("move_id") or "",
        })
        if len(state.line) >= 2 and state.line[-2] == version:
            state.line.pop()
        elif not state.line or state.line[-1] != version:
            state.line.append(version)
    return states, rejected


def describe(move: dict[str, Any]) -> str:
    who = move["actor"] or "an older release (no actor recorded)"
    return (f"v{move['version']} by {who} at {move['set_at']:%Y-%m-%d %H:%M:%S UTC} "
            f"({move['reason'] or 'no reason given'})")




__all__ = ["MOVES_SCHEMA", "UNCHECKED", "AliasState", "default_actor", "describe", "replay", "utc"]
