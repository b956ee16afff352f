"""Many-to-many links (:mod:`.links`) as ``--verify`` compares and
``--repair`` mends them.

A travelling collection is compared as part of its owner record: one
synthetic attribute named by the relationship (``tags``), holding the
sorted canonical identities of the linked records, as the wire names
them, never their local ids, which differ per side.  It is folded into
the record's digest (:mod:`.digests`), so a link added or removed by hand
on either side's association table makes its owner differ, and the
descent finds it in traffic that grows with the differences, not with
the tables.  A linked record with no identity (never shared) is compared
as :data:`.digests.UNSHARED`.

Reading is a query per relationship per partition of owners, never per
record.  The stamps of the last change of each link
(``communicator_links``) are read only for the records of a differing
leaf: :mod:`.repair` settles each link present on one side only by them
(:func:`decide`), and the winning side sends its state as an ordinary
link message stamped now (:func:`relink`), which the other side applies
under the trust rule like any other.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import and_, exists, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from .links import Link, links, send_states
from .models import communicator_links, communicator_mappings
from .records import Receiver
from .versions import HERE

M = communicator_mappings.c
L = communicator_links.c
Identity = tuple[str, int]
#: Rows per ``IN`` list.
CHUNK = 500
#: A compared member that no identity names (see :data:`.digests.UNSHARED`).
UNSHARED = ['unshared']


def owned(receiver: Receiver) -> list[Link]:
    """The travelling relationships ``receiver`` owns that verify can
    compare: integer-keyed owner and target, one column each way."""
    found = []
    for link in links().values():
        if link.owner.name != receiver.name or link.owner.keyed or link.target.keyed:
            continue
        rel = _relationship(link)
        if len(rel.synchronize_pairs) == 1 and len(rel.secondary_synchronize_pairs) == 1:
            found.append(link)
    return sorted(found, key=lambda link: link.key)


def _relationship(link: Link) -> Any:
    from sqlalchemy import inspect
    return inspect(link.owner.cls).relationships[link.key]


def _columns(link: Link) -> tuple[Any, Any]:
    """The association table's (owner, target) columns."""
    rel = _relationship(link)
    return rel.synchronize_pairs[0][1], rel.secondary_synchronize_pairs[0][1]


def _canonical(origin: str, local_name: str) -> str:
    return local_name if origin == HERE else origin


def members(connection: Connection, link: Link, owner_ids: Iterable[int],
            local_name: str) -> dict[int, list[list]]:
    """Owner local id -> the sorted identities of its linked records (each
    the smallest identity of its record, the rule :mod:`.digests` applies
    to foreign keys), a query per :data:`CHUNK` owners."""
    owner_col, target_col = _columns(link)
    ids = sorted(set(owner_ids))
    found: dict[int, dict[int, list]] = {}
    for start in range(0, len(ids), CHUNK):
        statement = (
            select(owner_col, target_col, M.origin, M.original_id)
            .select_from(owner_col.table.outerjoin(communicator_mappings, and_(
                M.name == link.target.name, M.local_id == target_col)))
            .where(owner_col.in_(ids[start:start + CHUNK])))
        # Fetched whole: a partition's links, row by row, cost more in
        # fetching than in comparing.
        for owner_id, target_id, origin, original_id in connection.execute(statement).all():
            targets = found.setdefault(owner_id, {})
            identity = (('unshared',) if origin is None
                        else (local_name if origin == HERE else origin, original_id))
            kept = targets.get(target_id)
            if kept is None or identity < kept:
                targets[target_id] = identity
    return {owner_id: [list(identity) for identity in sorted(targets.values())]
            for owner_id, targets in found.items()}


def stamps(connection: Connection, link: Link, owner_ids: Iterable[int],
           local_name: str) -> dict[int, list[list]]:
    """Owner local id -> ``[target identity, linked, hlc, app]`` of each
    link change kept for it (``communicator_links``), linked or removed."""
    ids = sorted(set(owner_ids))
    found: dict[int, list[list]] = {}
    for start in range(0, len(ids), CHUNK):
        statement = (
            select(L.owner_id, L.linked, L.hlc, L.app, M.origin, M.original_id)
            .select_from(communicator_links.join(communicator_mappings, and_(
                M.name == link.target.name, M.local_id == L.target_id)))
            .where(L.name == link.name, L.owner_id.in_(ids[start:start + CHUNK])))
        for row in connection.execute(statement):
            found.setdefault(row.owner_id, []).append(
                [[_canonical(row.origin, local_name), row.original_id], bool(row.linked),
                 row.hlc, _canonical(row.app, local_name)])
    for rows in found.values():
        rows.sort()
    return found


def check_stamps(item: Any, receiver_name: str) -> dict[str, list[list]]:
    """A peer's stamps of an entry, checked whole; ValueError (one line)."""
    known = {link.key: link for link in links().values() if link.owner.name == receiver_name}
    if not isinstance(item, dict) or not item.keys() <= known.keys():
        raise ValueError('stamps are {relationship: [[identity, linked, hlc, app], ...]}')
    for rows in item.values():
        if not isinstance(rows, list):
            raise ValueError('stamps of a relationship are a list')
        for row in rows:
            if not (isinstance(row, list) and len(row) == 4 and _identity(row[0])
                    and isinstance(row[1], bool) and _int(row[2])
                    and isinstance(row[3], str) and 0 < len(row[3]) <= 64):
                raise ValueError('a stamp is [identity, linked, hlc, app]')
    return item


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63


def _identity(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and 0 < len(value[0]) <= 64 and _int(value[1]))


def identities(members: Any) -> set[Identity]:
    """The identities among compared members (the peer's are hostile:
    anything but an identity is no link to send)."""
    if not isinstance(members, list):
        return set()
    return {(member[0], member[1]) for member in members if _identity(member)}


def unshared(members: Any) -> int:
    """How many compared members name no shared record."""
    return members.count(UNSHARED) if isinstance(members, list) else 0


def decide(target: list, local_stamps: Sequence[list], peer_stamps: Sequence[list],
           local_name: str, peer_name: str, prefer: str) -> str:
    """Which side's membership of one link wins: the side whose kept
    change of it is later; where the stamps are equal or missing (a link
    added or removed by SQL run by hand), ``prefer``'s.  'local' or 'peer'."""
    def stamp(rows: Sequence[list]) -> tuple[int, str] | None:
        for row in rows:
            if row[0] == target:
                return row[2], row[3]
        return None

    ours, theirs = stamp(local_stamps), stamp(peer_stamps)
    if ours is not None and theirs is not None and ours != theirs:
        return 'local' if ours > theirs else 'peer'
    return 'local' if prefer == local_name else 'peer'


def check_items(items: Any, receiver_name: str, limit: int) -> tuple[tuple, ...]:
    """A ``relink`` request's ``links``: ``[relationship, owner identity,
    target identity]`` each, at most ``limit``; ValueError (one line)."""
    known = {link.key for link in links().values() if link.owner.name == receiver_name}
    if not isinstance(items, list) or len(items) > limit:
        raise ValueError(f'"links" must be a list of at most {limit}')
    found = []
    for item in items:
        if not (isinstance(item, list) and len(item) == 3 and item[0] in known
                and _identity(item[1]) and _identity(item[2])):
            raise ValueError('a link is [relationship of the record, owner identity, '
                             'target identity]')
        found.append((item[0], tuple(item[1]), tuple(item[2])))
    return tuple(found)


def relink(session: Session, receiver: Receiver, items: Sequence[tuple],
           local_name: str) -> tuple[int, list]:
    """Send this side's state of these links (``(relationship, owner
    identity, target identity)``) as link changes stamped now, in
    ``session``'s transaction: the other side takes them as later than any
    it holds.  Both records are found by their identities in
    ``communicator_mappings``: a record never shared has none, and is never
    named.  Returns how many were sent and the items skipped."""
    connection = session.connection()
    by_key = {link.key: link for link in owned(receiver)}
    sent, skipped = 0, []
    states: dict[str, list[tuple[int, int, bool]]] = {}
    for key, owner, target in items:
        link = by_key.get(key)
        owner_id = _local_id(connection, receiver.name, owner, local_name)
        target_id = (_local_id(connection, link.target.name, target, local_name)
                     if link is not None else None)
        if link is None or owner_id is None or target_id is None:
            skipped.append([key, list(owner), list(target)])
            continue
        owner_col, target_col = _columns(link)
        linked = connection.execute(select(exists().where(
            owner_col == owner_id, target_col == target_id))).scalar()
        states.setdefault(key, []).append((owner_id, target_id, bool(linked)))
    for key, pairs in states.items():
        send_states(connection, by_key[key], pairs)
        sent += len(pairs)
    if sent:
        mark_changed(session)
    return sent, skipped


def _local_id(connection: Connection, name: str, identity: Sequence, local_name: str,
              ) -> int | None:
    origin = HERE if identity[0] == local_name else identity[0]
    return connection.execute(select(M.local_id).where(
        M.name == name, M.origin == origin, M.original_id == identity[1],
        M.local_id.is_not(None))).scalar()
