"""Many-to-many links: a ``relationship(secondary=...)`` between two synced
models travels as changes of membership (this link added, that one
removed), never as the whole collection, so that what both sides add
concurrently survives.

Each change is stamped ``(hlc, app)`` like an edit of a record
(:mod:`.versions`), and each link keeps the stamp of its last change in
``communicator_links``, by the local ids of its two records.  A change
applies only if its stamp is later than the one kept: concurrent changes
of one link settle the same way on both sides (the later stamp wins,
last-writer-wins per link), and a message that comes again, late or
twice never brings a removed link back.

Publishing follows the owner model's: with ``autopublish``, a flush that
changes the collection (from either side of a bidirectional pair)
writes the link messages after the records' own, in the same
transaction; ``publish(session, obj)`` sends how the collection differs
from what was last sent or received.  The body is :mod:`.link_bodies`'.

Applying checks the trust rule (:mod:`.trust`): the two records are named
by identities that must have been shared with the peer or be its own; a
record of the peer's that has not arrived yet makes the message wait (a
failure, retried), as a foreign key does.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from typing import Any

from pyramid.threadlocal import get_current_registry
from sqlalchemy import bindparam, event, inspect, select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import tracking, wire
from .link_bodies import LINK, LinkChange, check_fields
from .messages import SETTINGS_INFO
from .models import communicator_links, communicator_mappings, outbound_messages, utcnow
from .records import APPLYING, Receiver, receiver_for, receiver_of_class, receivers
from .settings import REGISTRY_KEY
from .trust import Refused
from .versions import FUTURE_LIMIT, HERE, now_hlc

__all__ = ['LINK', 'Link', 'apply_link', 'links', 'listen', 'publish_links']

L = communicator_links.c
M = communicator_mappings.c
_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode


@dataclasses.dataclass(frozen=True)
class Link:
    """A relationship whose links travel: ``owner``'s attribute ``key``,
    holding records of ``target``; ``reverse`` is the attribute of the
    other direction of a bidirectional pair (its changes are this link's)."""
    owner: Receiver
    key: str
    target: Receiver
    reverse: str | None

    @property
    def name(self) -> str:
        """The relationship on the wire and in ``communicator_links``."""
        return f'{self.owner.name}.{self.key}'


# -- which relationships travel -------------------------------------------------

_cache: tuple[tuple[str, ...], dict[str, Link]] | None = None


def links() -> dict[str, Link]:
    """The relationships whose links travel, by :attr:`Link.name`; found
    once the mappers are configured, again whenever a model registers."""
    global _cache
    names = tuple(receiver.name for receiver in receivers())
    if _cache is None or _cache[0] != names:
        _cache = (names, _discover())
    return _cache[1]


def _discover() -> dict[str, Link]:
    found = {}
    for receiver in receivers():
        for rel in inspect(receiver.cls).relationships:
            if rel.secondary is None or rel.viewonly or not rel.uselist:
                continue
            target = receiver_of_class(rel.mapper.class_)
            if target is None:
                continue
            reverse = _reverse(rel)
            # A pair travels once, as the direction whose (record name,
            # attribute) sorts first; excluding either direction stops it.
            if reverse is not None and (target.name, reverse.key) < (receiver.name, rel.key):
                continue
            if not receiver.crosses(rel.key):
                continue
            if reverse is not None and not target.crosses(reverse.key):
                continue
            link = Link(receiver, rel.key, target, reverse.key if reverse else None)
            found[link.name] = link
    return found


def _reverse(rel: Any) -> Any:
    """The relationship of the other direction over the same association
    table, if the target model has one."""
    owner = rel.parent.class_
    for other in rel.mapper.relationships:
        if (other is not rel and other.secondary is rel.secondary and not other.viewonly
                and issubclass(owner, other.mapper.class_)):
            return other
    return None


def _watched(cls: type) -> list[tuple[Link, str, bool]]:
    """(link, attribute, as owner) of the attributes of ``cls`` whose
    changes are link changes (asked for every object a flush wrote)."""
    known = links()
    cached = _watching.get(cls)
    if cached is not None and cached[0] is known:
        return cached[1]
    found = []
    for link in known.values():
        if issubclass(cls, link.owner.cls):
            found.append((link, link.key, True))
        if link.reverse is not None and issubclass(cls, link.target.cls):
            found.append((link, link.reverse, False))
    _watching[cls] = (known, found)
    return found


_watching: dict[type, tuple[dict[str, Link], list[tuple[Link, str, bool]]]] = {}


# -- publishing -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Change:
    link: Link
    owner_id: int
    target_id: int
    linked: bool


def _local_id(obj: object) -> int | None:
    state = inspect(obj)
    if state.identity is not None:
        return state.identity[0] if len(state.identity) == 1 else None
    key = state.mapper.primary_key_from_instance(obj)  # inserted, not yet keyed
    return key[0] if len(key) == 1 else None


def listen() -> None:
    """Publish the link changes of autopublished models at each flush
    (after the records' own messages: :func:`.publishing.receives_from`
    calls this after it listens itself)."""
    if not event.contains(Session, 'after_flush', _after_flush):
        event.listen(Session, 'after_flush', _after_flush)


def _gem_peer(session: Session) -> bool:
    """Does the peer run the Ruby gem (``communicator.gem_peer``), which
    knows no links?  Known in a request, a bootstrapped script and a
    handler; a session of neither cannot tell, and publishes."""
    settings = session.info.get(SETTINGS_INFO) or get_current_registry().get(REGISTRY_KEY)
    return settings is not None and settings.gem_peer


def _after_flush(session: Session, flush_context: Any) -> None:
    if session.info.get(APPLYING) or not links() or _gem_peer(session):
        return
    found: dict[tuple[str, int, int], _Change] = {}
    # Before after_flush returns, new and dirty still hold what this flush
    # wrote, with the attributes' history.
    for obj in [*session.new, *session.dirty]:
        for link, attribute, as_owner in _watched(type(obj)):
            if not link.owner.autopublish:
                continue
            history = inspect(obj).attrs[attribute].history
            for others, linked in ((history.added, True), (history.deleted, False)):
                for other in others:
                    owner, target = (obj, other) if as_owner else (other, obj)
                    owner_id, target_id = _local_id(owner), _local_id(target)
                    if owner_id is not None and target_id is not None:
                        found[(link.name, owner_id, target_id)] = _Change(
                            link, owner_id, target_id, linked)
    if found:
        _write(session.connection(), list(found.values()))


def publish_links(session: Session, obj: object) -> int:
    """Send how ``obj``'s synced collections differ from what was last
    sent or received (links added since, links removed since), in
    ``session``'s transaction; returns how many link messages (none to a
    gem peer)."""
    receiver = receiver_of_class(type(obj))
    owned = [link for link in links().values()
             if receiver is not None and link.owner.name == receiver.name]
    if owned and _gem_peer(session):
        return 0
    owner_id = _local_id(obj) if owned else None
    if owner_id is None:
        return 0
    connection = session.connection()
    changes = []
    for link in owned:
        with session.no_autoflush:
            current = {_local_id(target) for target in getattr(obj, link.key)}
        current.discard(None)
        known = {row.target_id for row in connection.execute(
            select(L.target_id).where(L.name == link.name, L.owner_id == owner_id,
                                      L.linked == 1))}
        changes += [_Change(link, owner_id, target_id, True)
                    for target_id in sorted(current - known)]
        changes += [_Change(link, owner_id, target_id, False)
                    for target_id in sorted(known - current)]
    if changes:
        _write(connection, changes)
        mark_changed(session)
    return len(changes)


def _write(connection: Connection, changes: list[_Change]) -> None:
    """Stamp the changes, keep their stamps, and queue their messages."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for change in changes:
        wanted[change.link.owner.name].add(change.owner_id)
        wanted[change.link.target.name].add(change.target_id)
    tracked = {name: tracking.of_records(connection, name, ids, lock=False)
               for name, ids in wanted.items()}

    def identity(name: str, local_id: int) -> list:
        # Never sent: named as ours; the peer waits until it arrives.
        origin, original_id = (tracked[name][local_id].identity
                               if local_id in tracked[name] else (None, local_id))
        return [origin or HERE, original_id]

    states = _states(connection, changes)
    rows, inserts, updates = [], [], []
    for change in changes:
        previous = states.get((change.link.name, change.owner_id, change.target_id))
        hlc = now_hlc()
        if previous is not None:
            hlc = max(hlc, previous.hlc + 1)  # after every change of it seen here
            updates.append({'_id': previous.id, '_linked': int(change.linked), '_hlc': hlc})
        else:
            inserts.append({'name': change.link.name, 'owner_id': change.owner_id,
                            'target_id': change.target_id, 'linked': int(change.linked),
                            'hlc': hlc, 'app': HERE})
        fields = {'record': change.link.owner.name, 'relationship': change.link.key,
                  'owner': identity(change.link.owner.name, change.owner_id),
                  'target': identity(change.link.target.name, change.target_id),
                  'linked': change.linked, 'stamp': [hlc, HERE]}
        rows.append({'body': _compact({LINK: fields}), 'origin': None, 'original_id': None,
                     'refs': None, 'version': None, 'format': wire.LINK_FORMAT,
                     'created_at': utcnow()})
    if inserts:
        connection.execute(communicator_links.insert(), inserts)
    if updates:
        connection.execute(communicator_links.update().where(L.id == bindparam('_id'))
                           .values(linked=bindparam('_linked'), hlc=bindparam('_hlc'),
                                   app=HERE), updates)
    connection.execute(outbound_messages.insert(), rows)


def _states(connection: Connection, changes: list[_Change]) -> dict[tuple[str, int, int], Any]:
    """The kept states of the changed links, a query per relationship,
    locked by primary key (a range read FOR UPDATE would take gap locks on
    MariaDB): a concurrent change of the same link waits, then stamps
    after this one."""
    wanted: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for change in changes:
        wanted[change.link.name].add((change.owner_id, change.target_id))
    found = {}
    for name, pairs in wanted.items():
        ordered = sorted(pairs)
        for start in range(0, len(ordered), 500):
            chunk = ordered[start:start + 500]
            # Both ids among the chunk's: a superset of its pairs, never
            # every link of a large collection.
            for row in connection.execute(
                    select(L.id, L.owner_id, L.target_id, L.linked, L.hlc, L.app)
                    .where(L.name == name,
                           L.owner_id.in_(sorted({owner for owner, _ in chunk})),
                           L.target_id.in_(sorted({target for _, target in chunk})))):
                if (row.owner_id, row.target_id) in pairs:
                    found[(name, row.owner_id, row.target_id)] = row
    if found and connection.dialect.name != 'sqlite':
        ids = sorted(row.id for row in found.values())
        locked = connection.execute(
            select(L.id, L.owner_id, L.target_id, L.linked, L.hlc, L.app, L.name)
            .where(L.id.in_(ids)).order_by(L.id).with_for_update()).all()
        found = {(row.name, row.owner_id, row.target_id): row for row in locked}
    return found


def _state(connection: Connection, name: str, owner_id: int, target_id: int) -> Any:
    statement = select(L.id, L.linked, L.hlc, L.app).where(
        L.name == name, L.owner_id == owner_id, L.target_id == target_id)
    if connection.dialect.name != 'sqlite':
        statement = statement.with_for_update()
    return connection.execute(statement).first()


def _save(connection: Connection, previous: Any, change: _Change, hlc: int, app: str) -> None:
    values = {'linked': int(change.linked), 'hlc': hlc, 'app': app}
    if previous is None:
        connection.execute(communicator_links.insert().values(
            name=change.link.name, owner_id=change.owner_id, target_id=change.target_id,
            **values))
    else:
        connection.execute(communicator_links.update().where(L.id == previous.id)
                           .values(**values))


# -- applying ---------------------------------------------------------------------

def apply_link(session: Session, local_name: str, sender: str, fields: Any) -> None:
    """Apply one received link change in ``session``'s transaction, if its
    stamp is later than the last change of the link known here; the
    caller flushes.

    :class:`.trust.Refused` for what the peer may not do; LookupError (a
    failure, retried) while a record of the link has not arrived yet."""
    change = check_fields(fields)
    receiver = receiver_for(change.record)  # an unknown name fails, as a record's does
    link = links().get(f'{receiver.name}.{change.relationship}')
    if link is None:
        return  # it does not travel here (exclude/only): skipped, as an attribute is
    if 'update' not in receiver.accept:
        raise Refused(f'{receiver.name} does not accept updates from {sender}: '
                      f'no link of {link.name} is changed')
    if change.app != sender:
        raise Refused(f'{sender} sent a change of {link.name} stamped by {change.app}: '
                      'a peer stamps only its own changes')
    if change.hlc > now_hlc() + FUTURE_LIMIT:
        raise Refused(f'the stamp {sender} sent is more than a day ahead of '
                      "this host's clock")
    connection = session.connection()
    owner_id = _resolve(connection, link.owner.name, change.owner, sender, local_name)
    target_id = _resolve(connection, link.target.name, change.target, sender, local_name)
    if owner_id is None or target_id is None:
        return  # one of them was deleted here: no link to change
    previous = _state(connection, link.name, owner_id, target_id)
    if previous is not None and _later_or_same(previous, change, local_name):
        return  # an older change (or this one again) than the one kept
    # Through the ORM, so that the host's collection events run; flushed
    # with the batch (by the caller), not link by link.
    with session.no_autoflush:
        owner = session.get(link.owner.cls, owner_id)
        target = session.get(link.target.cls, target_id)
        if owner is None or target is None:
            raise LookupError(f'a record of {link.name} {owner_id} -> {target_id} '
                              'does not exist here')
        collection = getattr(owner, link.key)
        if change.linked and target not in collection:
            collection.append(target)
        elif not change.linked and target in collection:
            collection.remove(target)
    _save(connection, previous, _Change(link, owner_id, target_id, change.linked),
          change.hlc, change.app)


def _later_or_same(previous: Any, change: LinkChange, local_name: str) -> bool:
    kept = (previous.hlc, local_name if previous.app == HERE else previous.app)
    return kept >= (change.hlc, change.app)


def _resolve(connection: Connection, name: str, identity: tuple[str, int], sender: str,
             local_name: str) -> int | None:
    """The local id of the record an identity names (None: deleted here).
    A record of ours must have been sent to the peer."""
    origin, original_id = identity
    own = origin == local_name
    row = connection.execute(select(M.local_id).where(
        M.name == name, M.origin == (HERE if own else origin),
        M.original_id == original_id)).first()
    if row is not None:
        return row.local_id
    if own:
        raise Refused(f'{sender} links {name} {original_id} of {local_name}, '
                      'which was never sent to it')
    raise LookupError(f'links {name} {original_id} of {origin}, which is not here (yet)')
