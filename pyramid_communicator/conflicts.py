"""Conflict policies, and the record of every conflict.

Two edits *conflict* when neither side had seen the other's when it made
its own (their stamps are concurrent, see :mod:`.versions`).  A policy
decides which value a record keeps; it sees the two edits ordered by
their stamps, never as "mine" and "theirs", so that both sides decide
the same thing.

- :data:`NEWEST_WINS` (the default): per attribute, the edit with the
  greater ``(hlc, app)`` wins; a concurrent delete wins over updates.
- :func:`authority`: the named app's edit wins, its delete too, and its
  update wins over another app's delete; between other apps, newest wins.
- any callable ``merge(conflict) -> value``: computes the value kept for
  one attribute from a :class:`Conflict`; deletes win over updates.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from .models import utcnow
from .versions import Stamp


@dataclasses.dataclass(frozen=True)
class Edit:
    """One side of a conflict: the value an app wrote, and the edit's stamp."""
    value: Any
    app: str
    hlc: int


@dataclasses.dataclass(frozen=True)
class Conflict:
    """What a custom merge is called with: ``older`` and ``newer`` are
    ordered by ``(hlc, app)``, the same on every side."""
    name: str
    attribute: str
    older: Edit
    newer: Edit


class Policy:
    """Newest edit wins, attribute by attribute; deletes win."""
    label = 'newest'

    def winner(self, conflict: Conflict) -> Edit:
        return conflict.newer

    def value(self, conflict: Conflict) -> Any:
        """The value both sides keep."""
        return self.winner(conflict).value

    def update_beats_delete(self, update_apps: set[str], delete_app: str) -> bool:
        """Does a concurrent update by ``update_apps`` survive a delete by
        ``delete_app``?"""
        return False


NEWEST_WINS = Policy()


class Authority(Policy):
    def __init__(self, app: str) -> None:
        self.app = app
        self.label = f'authority:{app}'

    def winner(self, conflict: Conflict) -> Edit:
        if conflict.older.app == self.app and conflict.newer.app != self.app:
            return conflict.older
        return conflict.newer

    def update_beats_delete(self, update_apps: set[str], delete_app: str) -> bool:
        return delete_app != self.app and self.app in update_apps


def authority(app: str) -> Policy:
    """A policy under which the app named ``app`` (its ``communicator.name``)
    always wins conflicts."""
    return Authority(app)


class Custom(Policy):
    def __init__(self, merge: Callable[[Conflict], Any]) -> None:
        self.merge = merge
        self.label = f'custom:{getattr(merge, "__qualname__", "merge")}'[:64]

    def value(self, conflict: Conflict) -> Any:
        return self.merge(conflict)


def as_policy(conflicts: Policy | Callable[[Conflict], Any] | str | None) -> Policy:
    """What ``receives_from(conflicts=...)`` accepts: None or ``'newest'``,
    ``'authority:APP'``, a policy object, or a merge callable."""
    if conflicts is None or conflicts == 'newest':
        return NEWEST_WINS
    if isinstance(conflicts, Policy):
        return conflicts
    if isinstance(conflicts, str) and conflicts.startswith('authority:') and len(conflicts) > 10:
        return Authority(conflicts.split(':', 1)[1])
    if callable(conflicts):
        return Custom(conflicts)
    raise ValueError(f"conflicts must be 'newest', 'authority:APP', authority(APP) "
                     f'or a callable, not {conflicts!r}')


def row(*, name: str, origin: str | None, original_id: int | None,
        local_id: int | None, attribute: str | None, local: Any, remote: Any,
        local_stamp: Stamp | None, remote_stamp: Stamp | None, winner: str, kept: Any,
        peer: str, policy: Policy) -> dict[str, Any]:
    """A row of ``communicator_conflicts``: the record, both values, which
    won and when.  ``attribute`` None is a delete against an update."""
    def encode(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False, default=str)[:4000]

    def stamp(value: Stamp | None) -> str | None:
        return None if value is None else f'{value[0]}@{value[1]}'

    return dict(
        name=name, origin=origin, original_id=original_id, local_id=local_id,
        attribute=attribute, local_value=encode(local), remote_value=encode(remote),
        kept_value=encode(kept), local_stamp=stamp(local_stamp),
        remote_stamp=stamp(remote_stamp), winner=winner, policy=policy.label[:64],
        peer=peer[:255], created_at=utcnow())
