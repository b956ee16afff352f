"""The order a batch's record messages are applied in, so that a record
whose foreign keys name other synced records finds them, whatever order
the peer sent them in.

A peer sends records in the order they were published, which need not
put a parent before its child (a tree re-parented, a ``--publish-all`` by
primary key, a record created before the one it points at), and two
models may point at each other.  Within a batch the messages are
therefore applied in dependency order: a message whose foreign key names
a record that is not here but is created by another message of the batch
comes after that message.  Messages of one record keep their order.  A
batch already in such an order (the usual case) is applied exactly as
sent; another goes in waves, each in the order sent, so that the records
a wave needs are flushed together, not one by one.

Where records of the batch point at each other in a cycle (``a.b_id``
and ``b.a_id``, or a record its own parent), no order works: the
earliest of the cycle is created with that foreign key empty and it is
set when the batch is written, once the other record exists
(:meth:`.working_set.WorkingSet.defer_reference`).  Such a column must
be nullable: with ``NOT NULL`` the message fails as before.

A message whose foreign key names a record neither here nor created in
the batch is *unresolved*: the batch raises :class:`Unresolved` before
writing anything, and :mod:`.inbox` sets the message aside and tries it
again once the rest of the run is applied (and, if it still cannot be,
keeps it as failed, retried on later runs).
"""
from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from . import keyrefs, keys
from .printable import printable
from .records import Receiver, WireTypeError, from_wire, receiver_for
from .versions import HERE

if TYPE_CHECKING:
    from .applying import Message
    from .working_set import WorkingSet


class Unresolved(LookupError):
    """Messages of a batch whose foreign keys name records that are not
    here (yet), by position in the batch, with why."""

    def __init__(self, reasons: dict[Any, str]) -> None:
        super().__init__('; '.join(sorted(set(reasons.values())))[:500])
        self.reasons = reasons


@dataclasses.dataclass
class Plan:
    #: Positions of the messages, in the order to apply them.
    order: list[int]
    #: Position -> why it cannot be applied in this batch.
    unresolved: dict[int, str]
    #: (position, attribute): a foreign key to a record created later in
    #: the batch, set when the batch is written (a cycle).
    deferred: set[tuple[int, str]]


def _identity(name: str, origin: str | None, original_id: int | None,
              local_name: str) -> tuple | None:
    if original_id is None:
        return None
    return (name, HERE if origin in (None, local_name) else origin, original_id)


def arrange(work: WorkingSet, messages: Sequence[Message]) -> Plan:
    """The order to apply ``messages`` in (after ``work.preload``)."""
    local_name = work.local_name
    count = len(messages)
    keys: list[tuple | None] = []
    first_of: dict[tuple, int] = {}
    for position, message in enumerate(messages):
        try:
            name = message.decode()[0]
        except ValueError:
            name = None
        key = None if name is None else _identity(name, message.origin, message.original_id,
                                                  local_name)
        keys.append(key)
        if key is not None:
            first_of.setdefault(key, position)
            # A keyed record's original_id is its key's handle, the same
            # whoever sent it: what a foreign key to it names (:mod:`.keyrefs`).
            first_of.setdefault((key[0], None, key[2]), position)
    successors: list[list[int]] = [[] for _ in range(count)]
    #: position -> [(creator position, attribute)] of foreign keys waiting
    waits_on: list[list[tuple[int, str]]] = [[] for _ in range(count)]
    unresolved: dict[int, str] = {}
    deferred: set[tuple[int, str]] = set()
    previous: dict[tuple, int] = {}
    for position, message in enumerate(messages):
        key = keys[position]
        if key is not None:
            if key in previous:  # the record's messages keep their order
                successors[previous[key]].append(position)
                waits_on[position].append((previous[key], ''))
            previous[key] = position
        for attribute, target_key, origin in _missing(work, message):
            creator = first_of.get(target_key)
            if creator is None:
                unresolved.setdefault(position, (
                    f'refers to {target_key[0]} {target_key[2]} of {origin}, which is not '
                    'here (yet)') if target_key[1] is not None else (
                    f'refers to {target_key[0]} {origin}, which is not here (yet)'))
            elif creator == position:
                if attribute:
                    deferred.add((position, attribute))  # a record its own parent
            else:
                successors[creator].append(position)
                waits_on[position].append((creator, attribute))
    _spread(unresolved, successors)
    remaining = {p for p in range(count) if p not in unresolved}
    if all(creator < position for position in remaining for creator, _ in waits_on[position]):
        # Already in order (the usual case): applied exactly as sent.
        return Plan(sorted(remaining), unresolved, deferred)
    indegree = {p: sum(1 for creator, _ in waits_on[p] if creator in remaining)
                for p in remaining}
    # Otherwise in waves, each in the order sent: what depends on nothing
    # waiting, then what depended only on those, ...  A wave's records are
    # flushed together when the next one first needs their ids.
    wave = sorted(p for p in remaining if indegree[p] == 0)
    order: list[int] = []
    while remaining:
        if not wave:
            # A cycle: its earliest message goes first, its foreign keys
            # to the others set once they exist.
            position = min(remaining)
            for creator, attribute in waits_on[position]:
                if creator in remaining and attribute:
                    deferred.add((position, attribute))
            wave = [position]
        following = []
        for position in wave:
            remaining.discard(position)
            order.append(position)
            for successor in successors[position]:
                if successor in remaining:
                    indegree[successor] -= 1
                    if indegree[successor] == 0:
                        following.append(successor)
        wave = sorted(following)
    return Plan(order, unresolved, deferred)


def _spread(unresolved: dict[int, str], successors: list[list[int]]) -> None:
    """What waits for an unresolved message cannot be applied either."""
    queue = deque(unresolved)
    while queue:
        position = queue.popleft()
        for successor in successors[position]:
            if successor not in unresolved:
                unresolved[successor] = unresolved[position]
                queue.append(successor)


def _missing(work: WorkingSet, message: Message) -> list[tuple[str, tuple, str]]:
    """(attribute, target identity, its origin as sent) of the message's
    foreign keys that name a record not here.  A malformed message, or a
    reference the peer may not make, is left for applying to refuse."""
    try:
        name, attributes = message.decode()
        receiver = receiver_for(name)
        references = receiver.all_references()
    except (ValueError, LookupError):
        return []
    found = _missing_keyed(work, receiver, attributes)
    if not message.refs:
        return found
    for attribute, ref in message.refs.items():
        target = references.get(attribute)
        if target is None or not isinstance(ref, (list, tuple)) or len(ref) != 2:
            continue
        origin, original_id = ref
        if not isinstance(original_id, int) or isinstance(original_id, bool):
            continue
        own = origin == work.local_name
        identity = work.find(target.name, HERE if own else origin, original_id)
        if identity is not None and (identity.record is not None or
                                     identity.local_id is not None):
            continue
        if own and identity is None:
            continue  # never sent to the peer: refused when applied
        found.append((attribute, (target.name, HERE if own else origin, original_id),
                      str(origin)))
    return found


def _missing_keyed(work: WorkingSet, receiver: Receiver,
                   attributes: dict[str, Any]) -> list[tuple[str, tuple, str]]:
    """The foreign keys to keyed records (:mod:`.keyrefs`) that name a key
    not here: their target is ``(name, None, handle)``, which a create of
    that key in the batch has whoever sent it.  No attribute: such a
    reference is only waited for, never deferred."""
    found = []
    for target, named in keyrefs.targets(receiver, attributes):
        if work.match(target, named) is not None:
            continue
        try:
            columns = target.columns()
            key_text = keys.text(tuple(from_wire(columns[key], named[key], work.dialect)
                                       for key in target.primary_key))
        except (keys.BadKey, WireTypeError, ValueError, TypeError):
            continue  # refused when applied, with its reason
        found.append(('', (target.name, None, keys.handle_of(key_text)),
                      printable(key_text[:60])))
    return found
