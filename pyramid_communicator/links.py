"""Many-to-many links: a ``relationship(secondary=...)`` between two synced
models travels as changes of membership (this link added, that one
removed), never as the whole collection, so that what both sides add
concurrently survives.

Each change is stamped ``(hlc, app)`` like an edit of a record
(:mod:`.versions`), and each link keeps the stamp of its last change in
``communicator_links``, by the local ids of its two records (a keyed
record's is the handle of its key, :mod:`.keys`, as in the mappings;
the wire names it so too).  A change applies only if its stamp is later
than the one kept: concurrent changes of one link settle the same way on
both sides (the later stamp wins, last-writer-wins per link), and a
message that comes again, late or twice never brings a removed link
back.

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

from . import keys, tracking, wire
from .link_bodies import LINK, LinkChange, check_fields
from .messages import SETTINGS_INFO
from .models import communicator_links, communicator_mappings, outbound_messages, utcnow
from .records import APPLYING, Receiver, receiver_for, receiver_of_class, receivers
from .settings import REGISTRY_KEY
from .trust import Refused
from .versions import FUTURE_LIMIT, HERE, now_hlc

__all__ = ['LINK', 'NO_LINKS', 'Link', 'LinkBatch', 'apply_link', 'links', 'listen',
           'publish_links', 'send_states']

L = communicator_links.c
M = communicator_mappings.c
_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False).encode
#: A session whose ``info`` holds this publishes records without their
#: collections: ``--repair`` settles links one by one (:mod:`.link_verify`).
NO_LINKS = 'communicator.no_links'


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


def _local_id(receiver: Receiver, obj: object) -> int | None:
    """The record's id in the sync metadata: its primary key, or the
    handle of a keyed model's key (:mod:`.keys`), as mappings keep it."""
    if receiver.keyed:
        return keys.handle(receiver, obj)
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
    if session.deleted and links():
        _forget_links_of(session, session.deleted)
    if session.info.get(APPLYING) or not links():
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
                    owner_id = _local_id(link.owner, owner)
                    target_id = _local_id(link.target, target)
                    if owner_id is not None and target_id is not None:
                        found[(link.name, owner_id, target_id)] = _Change(
                            link, owner_id, target_id, linked)
    if found and not _gem_peer(session):
        _write(session.connection(), [found[key] for key in sorted(found)])


def _forget_links_of(session: Session, deleted: Any) -> None:
    """Drop the kept states of the links of records this flush deleted (by
    the host or applied from the peer): the delete removed the links, and a
    record given the same id later (SQLite hands ids anew) starts with none.

    A deleted target is found through the other direction of the pair (the
    ORM loaded it to delete the association rows), so that every statement
    goes by the (name, owner, target) index; a target model without that
    direction keeps the states (``publish`` skips them, see
    :func:`_forget_deleted`)."""
    pairs: dict[str, set[tuple[int, int]]] = defaultdict(set)
    owners: dict[str, set[int]] = defaultdict(set)
    for obj in deleted:
        for link in links().values():
            if isinstance(obj, link.owner.cls):
                local_id = _local_id(link.owner, obj)
                if local_id is not None:
                    owners[link.name].add(local_id)
            if link.reverse is not None and isinstance(obj, link.target.cls):
                local_id = _local_id(link.target, obj)
                if local_id is None:
                    continue
                history = inspect(obj).attrs[link.reverse].history
                for owner in (*history.unchanged, *history.deleted):
                    owner_id = _local_id(link.owner, owner)
                    if owner_id is not None:
                        pairs[link.name].add((owner_id, local_id))
    if not owners and not pairs:
        return
    connection = session.connection()
    for name, ids in owners.items():
        ordered = sorted(ids)
        for start in range(0, len(ordered), 500):
            connection.execute(communicator_links.delete().where(
                L.name == name, L.owner_id.in_(ordered[start:start + 500])))
    rows = [{'_name': name, '_owner': owner_id, '_target': target_id}
            for name, found in sorted(pairs.items()) for owner_id, target_id in sorted(found)]
    if rows:  # one statement, executed for each pair
        connection.execute(communicator_links.delete().where(
            L.name == bindparam('_name'), L.owner_id == bindparam('_owner'),
            L.target_id == bindparam('_target')), rows)


def publish_links(session: Session, obj: object) -> int:
    """Send how ``obj``'s synced collections differ from what was last
    sent or received (links added since, links removed since), in
    ``session``'s transaction; returns how many link messages (none to a
    gem peer)."""
    if session.info.get(NO_LINKS):
        return 0
    receiver = receiver_of_class(type(obj))
    owned = [link for link in links().values()
             if receiver is not None and link.owner.name == receiver.name]
    if owned and _gem_peer(session):
        return 0
    owner_id = _local_id(receiver, obj) if owned else None
    if owner_id is None:
        return 0
    connection = session.connection()
    changes = []
    forgotten = False
    for link in owned:
        with session.no_autoflush:
            current = {_local_id(link.target, target) for target in getattr(obj, link.key)}
        current.discard(None)
        known = {row.target_id for row in connection.execute(
            select(L.target_id).where(L.name == link.name, L.owner_id == owner_id,
                                      L.linked == 1))}
        changes += [_Change(link, owner_id, target_id, True)
                    for target_id in sorted(current - known)]
        gone = _forget_deleted(connection, link, owner_id, known - current)
        forgotten = forgotten or bool(gone)
        changes += [_Change(link, owner_id, target_id, False)
                    for target_id in sorted(known - current - gone)]
    if changes:
        _write(connection, changes)
    if changes or forgotten:
        mark_changed(session)
    return len(changes)


def send_states(connection: Connection, link: Link,
                states: list[tuple[int, int, bool]]) -> None:
    """Send these links' states (owner id, target id, linked) as changes
    stamped now, whatever was last sent: ``--repair`` (:mod:`.link_verify`)
    makes the other side take this side's membership."""
    _write(connection, [_Change(link, owner_id, target_id, linked)
                        for owner_id, target_id, linked in sorted(states)])


def _forget_deleted(connection: Connection, link: Link, owner_id: int,
                    target_ids: set[int]) -> set[int]:
    """Of the links kept as there but gone from the collection, those whose
    target record was deleted here: their states are dropped, and no
    removal is sent.  Its delete removed the link (and, with
    ``deletes=True``, travels); a removal would name a record with no
    identity left, which the peer could never find (nor should a record
    given the same id later inherit the state)."""
    if not target_ids:
        return set()
    ordered = sorted(target_ids)
    present: set[int] = set()
    for start in range(0, len(ordered), 500):
        present.update(_present(connection, link.target, ordered[start:start + 500]))
    gone = target_ids - present
    for start in range(0, len(gone), 500):
        connection.execute(communicator_links.delete().where(
            L.name == link.name, L.owner_id == owner_id,
            L.target_id.in_(sorted(gone)[start:start + 500])))
    return gone


def _present(connection: Connection, target: Receiver, ids: list[int]) -> set[int]:
    """Of these ids of ``target``'s records (handles for a keyed model),
    those whose record is still here.  A keyed record is found by the key
    its live mapping row keeps (a deleted one has none left)."""
    if not target.keyed:
        key = inspect(target.cls).primary_key[0]
        return set(connection.execute(select(key).where(key.in_(ids))).scalars())
    mappings = communicator_mappings.c
    texts = dict(connection.execute(
        select(mappings.local_key, mappings.local_id)
        .where(mappings.name == target.name, mappings.local_id.in_(ids),
               mappings.local_key.is_not(None))).all())
    if not texts:
        return set()
    columns = list(inspect(target.cls).primary_key)
    names = target.primary_key
    crossing = target.columns()
    found = set()
    for row in connection.execute(select(*columns).where(keys.where(target, list(texts)))):
        values = tuple(target.canonical(name, value) if name in crossing else value
                       for name, value in zip(names, row, strict=True))
        found.add(texts.get(keys.text(values)))
    found.discard(None)
    return found


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

    wanted_states: dict[str, set[tuple[int, int]]] = defaultdict(set)
    for change in changes:
        wanted_states[change.link.name].add((change.owner_id, change.target_id))
    states = _states(connection, wanted_states)
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


def _states(connection: Connection, wanted: dict[str, set[tuple[int, int]]],
            ) -> dict[tuple[str, int, int], Any]:
    """The kept states of links (relationship name -> (owner id, target
    id) pairs), a query per relationship, locked by primary key (a range
    read FOR UPDATE would take gap locks on MariaDB): a concurrent change of
    the same link waits, then stamps after this one."""
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


# -- applying ---------------------------------------------------------------------

class LinkBatch:
    """The link messages of one batch of inbound messages: the identities
    and kept stamps they name read a query per kind (again after records
    of the batch were written, which may be the ones they name), their new
    stamps written at the end (:meth:`write`)."""

    def __init__(self, session: Session, local_name: str) -> None:
        self.session = session
        self.local_name = local_name
        self.connection = session.connection()
        #: (name, origin, original id) -> local id (None: a tombstone).
        self.ids: dict[tuple[str, str, int], int | None] = {}
        #: (name, local id) -> ``local_key`` of keyed records (:mod:`.keys`).
        self.key_texts: dict[tuple[str, int], str] = {}
        #: (relationship, owner id, target id) -> [row id, linked, hlc, app].
        self.states: dict[tuple[str, int, int], list] = {}
        self.read: set[tuple[str, int, int]] = set()  # also those not kept
        self.inserts: dict[tuple[str, int, int], list] = {}
        self.changed: set[tuple[str, int, int]] = set()
        self.stale = True  # nothing read yet

    def preload(self, fields_list: list[Any]) -> None:
        """Read what these link messages name: a query per record name
        for identities, per relationship for stamps, per model for records."""
        self.stale = False
        self.ids.clear()  # records written since may have been mapped, or deleted
        named: dict[str, set[tuple[str, int]]] = defaultdict(set)
        wanted = []
        for fields in fields_list:
            try:
                change = check_fields(fields)
            except ValueError:
                continue  # refused when applied
            link = links().get(f'{change.record}.{change.relationship}')
            if link is None:
                continue
            both = (self._key(link.owner.name, change.owner),
                    self._key(link.target.name, change.target))
            for key in both:
                if key not in self.ids:
                    named[key[0]].add(key[1:])
            wanted.append((link, both))
        for name, identities in named.items():
            original_ids = sorted({original_id for _, original_id in identities})
            for start in range(0, len(original_ids), 500):
                for row in self.connection.execute(
                        select(M.origin, M.original_id, M.local_id, M.local_key).where(
                            M.name == name,
                            M.original_id.in_(original_ids[start:start + 500]))):
                    if (row.origin, row.original_id) in identities:
                        self._found(name, (row.origin, row.original_id), row)
        pairs: dict[str, set[tuple[int, int]]] = defaultdict(set)
        records: dict[Receiver, set[int]] = defaultdict(set)
        for link, (owner, target) in wanted:
            owner_id, target_id = self.ids.get(owner), self.ids.get(target)
            if owner_id is not None and target_id is not None:
                if (link.name, owner_id, target_id) not in self.read:
                    pairs[link.name].add((owner_id, target_id))
                records[link.owner].add(owner_id)
                records[link.target].add(target_id)
        for key, row in _states(self.connection, pairs).items():
            self.states[key] = [row.id, row.linked, row.hlc, row.app]
        self.read.update((name, *pair) for name, found in pairs.items() for pair in found)
        for receiver, local_ids in records.items():  # into the identity map, for get
            ordered = sorted(local_ids)
            with self.session.no_autoflush:
                for start in range(0, len(ordered), 500):
                    chunk = ordered[start:start + 500]
                    if receiver.keyed:
                        texts = [self.key_texts[(receiver.name, local_id)]
                                 for local_id in chunk
                                 if (receiver.name, local_id) in self.key_texts]
                        where = keys.where(receiver, texts) if texts else None
                    else:
                        where = inspect(receiver.cls).primary_key[0].in_(chunk)
                    if where is not None:
                        self.session.scalars(select(receiver.cls).where(where)).all()

    def _found(self, name: str, identity: tuple[str, int], row: Any) -> None:
        self.ids[(name, *identity)] = row.local_id
        if row.local_id is not None and row.local_key is not None:
            self.key_texts[(name, row.local_id)] = row.local_key

    def record(self, receiver: Receiver, local_id: int) -> object | None:
        """The local record a resolved id stands for (keyed models are
        found by the key kept in their mapping row)."""
        return keys.get(self.session, receiver, local_id,
                        self.key_texts.get((receiver.name, local_id)))

    def _key(self, name: str, identity: tuple[str, int]) -> tuple[str, str, int]:
        origin, original_id = identity
        return name, HERE if origin == self.local_name else origin, original_id

    def resolve(self, name: str, identity: tuple[str, int], sender: str) -> int | None:
        """The local id of the record an identity names (None: deleted
        here).  A record of ours must have been sent to the peer."""
        key = self._key(name, identity)
        if key not in self.ids:  # not preloaded, or written since
            row = self.connection.execute(select(M.local_id, M.local_key).where(
                M.name == name, M.origin == key[1], M.original_id == key[2])).first()
            if row is None:
                if key[1] == HERE:
                    raise Refused(f'{sender} links {name} {key[2]} of {self.local_name}, '
                                  'which was never sent to it')
                raise LookupError(f'links {name} {key[2]} of {key[1]}, '
                                  'which is not here (yet)')
            self._found(name, key[1:], row)
        return self.ids[key]

    def state(self, key: tuple[str, int, int]) -> list | None:
        if key not in self.read:
            self.read.add(key)
            for found, row in _states(self.connection, {key[0]: {key[1:]}}).items():
                self.states[found] = [row.id, row.linked, row.hlc, row.app]
        return self.states.get(key)

    def keep(self, key: tuple[str, int, int], linked: bool, hlc: int, app: str) -> None:
        kept = self.states.get(key)
        if kept is None:
            kept = self.states[key] = self.inserts[key] = [None, 0, 0, '']
        kept[1:] = [int(linked), hlc, app]
        self.changed.add(key)

    def write(self) -> None:
        """The new stamps, a statement per kind."""
        inserts = [{'name': key[0], 'owner_id': key[1], 'target_id': key[2],
                    'linked': kept[1], 'hlc': kept[2], 'app': kept[3]}
                   for key, kept in self.inserts.items()]
        updates = [{'_id': self.states[key][0], '_linked': self.states[key][1],
                    '_hlc': self.states[key][2], '_app': self.states[key][3]}
                   for key in self.changed if key not in self.inserts]
        if inserts:
            self.connection.execute(communicator_links.insert(), inserts)
        if updates:
            self.connection.execute(
                communicator_links.update().where(L.id == bindparam('_id'))
                .values(linked=bindparam('_linked'), hlc=bindparam('_hlc'),
                        app=bindparam('_app')), updates)
        self.inserts.clear()
        self.changed.clear()


def apply_link(batch: LinkBatch, sender: str, fields: Any) -> None:
    """Apply one received link change in the batch's transaction, if its
    stamp is later than the last change of the link known here; the
    caller flushes, and writes the batch.

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
    owner_id = batch.resolve(link.owner.name, change.owner, sender)
    target_id = batch.resolve(link.target.name, change.target, sender)
    if owner_id is None or target_id is None:
        return  # one of them was deleted here: no link to change
    key = (link.name, owner_id, target_id)
    kept = batch.state(key)
    if kept is not None and _later_or_same(kept, change, batch.local_name):
        return  # an older change (or this one again) than the one kept
    session = batch.session
    # Through the ORM, so that the host's collection events run; flushed
    # with the batch (by the caller), not link by link.
    with session.no_autoflush:
        owner = batch.record(link.owner, owner_id)
        target = batch.record(link.target, target_id)
        if owner is None or target is None:
            raise LookupError(f'a record of {link.name} {owner_id} -> {target_id} '
                              'does not exist here')
        collection = getattr(owner, link.key)
        if change.linked and target not in collection:
            collection.append(target)
        elif not change.linked and target in collection:
            collection.remove(target)
    batch.keep(key, change.linked, change.hlc, change.app)


def _later_or_same(kept: list, change: LinkChange, local_name: str) -> bool:
    stamp = (kept[2], local_name if kept[3] == HERE else kept[3])
    return stamp >= (change.hlc, change.app)
