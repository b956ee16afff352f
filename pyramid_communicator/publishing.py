"""Publishing: a change of a synced record becomes a message in the
outbound queue, in the transaction that made the change (the
transactional outbox), stamped with a new version of the record.

``receives_from`` registers a model and, with ``autopublish``, listens to
its mapper events; ``publish`` and ``publish_delete`` do it by hand.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, object_session
from zope.sqlalchemy import mark_changed

from . import keys, links, tracking, wire
from .conflicts import Conflict, Policy, as_policy
from .models import OutboundMessage, outbound_messages, utcnow
from .records import (
    APPLYING,
    OPERATIONS,
    Receiver,
    encode_body,
    fingerprint,
    natural_key,
    receiver_of,
    record_values,
    register,
)
from .versions import HERE, Version, to_wire

T = TypeVar('T', bound=type)

_compact = json.JSONEncoder(separators=(',', ':')).encode


def receives_from(name: str, *, exclude: Iterable[str] = (),
                  only: Iterable[str] | None = None,
                  autopublish: bool = False,
                  conflicts: Policy | Callable[[Conflict], Any] | str | None = None,
                  match_on: Iterable[str] = (),
                  deletes: bool = False,
                  accept: Iterable[str] | None = None) -> Callable[[T], T]:
    """Class decorator: this mapped class receives (and sends) records named
    ``name``.

    ``exclude`` attributes never cross the wire; ``only``, when given, is
    the allow-list of attributes that may.  ``autopublish`` publishes every
    insert and update (and, with ``deletes``, delete) flushed through any
    session, except changes that were themselves applied from an inbound
    message.  ``conflicts`` settles concurrent edits (see
    :mod:`.conflicts`); ``match_on`` names the natural key by which a
    record created on both sides is recognised as one; ``deletes`` sends
    and accepts deletes; ``accept`` limits what the peer may do to these
    records (``'create'``, ``'update'``, ``'delete'``; ``()`` makes the
    model publish-only).
    """
    if name.startswith('@'):
        raise ValueError(f'{name!r}: names starting with "@" are reserved '
                         '(plain messages are "@message")')
    match_on = tuple(match_on)
    if accept is None:
        accept = {'create', 'update'} | ({'delete'} if deletes else set())
    accept = frozenset(accept)
    if not accept <= OPERATIONS:
        raise ValueError(f'accept: unknown operations {sorted(accept - OPERATIONS)}')
    if 'delete' in accept and not deletes:
        raise ValueError("accept=['delete'] needs deletes=True")
    policy = as_policy(conflicts)

    def decorate(cls: T) -> T:
        receiver = Receiver(name, cls, frozenset(exclude),
                            None if only is None else frozenset(only),
                            autopublish, policy, match_on, deletes, accept)
        if keys.keyed(cls):
            # The key is the identity: it is the model's natural key.
            if match_on:
                raise ValueError(f'{name!r}: its primary key is its identity (see '
                                 'docs/models.rst, Primary keys); match_on is not needed')
            receiver = dataclasses.replace(receiver, keyed=True,
                                           match_on=tuple(receiver.primary_key))
        # Without match_on nothing is looked up yet: the mappers configure
        # later, once the models a relationship names are defined too.
        columns = receiver.columns() if receiver.match_on else {}
        missing = [key for key in match_on if key not in columns]
        if missing:
            raise ValueError(f'match_on {missing} of {name!r}: not attributes that cross '
                             'the wire')
        register(receiver)
        if autopublish:
            _listen_to_sessions()
            links.listen()  # after the records' own listener: their identities first
        # propagate: a subclass's records (inheritance) publish as the base's
        if autopublish and not event.contains(cls, 'after_insert', _autopublish):
            event.listen(cls, 'after_insert', _autopublish, propagate=True)
            event.listen(cls, 'after_update', _autopublish, propagate=True)
        if autopublish and deletes and not event.contains(cls, 'after_delete',
                                                           _autopublish_delete):
            event.listen(cls, 'after_delete', _autopublish_delete, propagate=True)
        return cls
    return decorate


@dataclasses.dataclass
class _Change:
    obj: object
    record_id: int | None
    deleted: bool = False
    #: Inserted in this flush: it may take a natural key deleted before.
    new: bool = False

    @functools.cached_property
    def values(self) -> dict[str, Any]:
        """The record's values, read once per publish."""
        return record_values(self.obj)

    @functools.cached_property
    def natural(self) -> str | None:
        """Its ``match_on`` key (None without one)."""
        return natural_key(receiver_of(self.obj), self.values)


class _Staging:
    """What one publishing call (or one flush) changes, computed with a
    query or two per model and written with a statement per kind."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.tracked: dict[str, dict[int, tracking.Tracked]] = {}
        self.tombstones: dict[str, dict[int, tuple[Version, int]]] = defaultdict(dict)
        self.natural: dict[str, dict[int, str | None]] = defaultdict(dict)
        self.natural_clocks: dict[str, dict[str, Version]] = defaultdict(dict)
        #: name -> handle -> key text of the keyed records staged (:mod:`.keys`).
        self.key_texts: dict[str, dict[int, str | None]] = defaultdict(dict)
        self.writes: dict[str, dict[str, dict[int, Version]]] = defaultdict(
            lambda: {'created': {}, 'revived': {}, 'changed': {}, 'buried': {}})

    def load(self, changes: list[_Change]) -> None:
        """The changed records' versions, locked, and those of the records
        their foreign keys point at: a query per model."""
        changed: dict[str, set[int]] = defaultdict(set)
        referenced: dict[str, set[int]] = defaultdict(set)
        for change in changes:
            receiver = receiver_of(change.obj)
            if change.record_id is not None:
                changed[receiver.name].add(change.record_id)
            if not change.deleted or receiver.keyed:  # a keyed delete names its key
                for key, target in receiver.references(type(change.obj)).items():
                    value = inspect(change.obj).dict.get(key)
                    if value is not None:
                        referenced[target.name].add(value)
        # Records inserted by this flush are rarely tracked yet: the
        # natural-key tombstones they may inherit are read with their
        # versions, in the same statement.
        digests: dict[str, set[str]] = defaultdict(set)
        for change in changes:
            if change.new:
                key = self._natural_key(change)
                if key is not None:
                    digests[receiver_of(change.obj).name].add(key)
        for name, local_ids in changed.items():
            self.tracked[name] = tracking.of_records(
                self.connection, name, local_ids, tombstones=self.tombstones[name],
                natural=self.natural_clocks[name], digests=digests.get(name, ()))
        self._natural_tombstones([change for change in changes if not change.new])
        for name, local_ids in referenced.items():
            known = self.tracked.setdefault(name, {})
            missing = local_ids - set(known) - changed.get(name, set())
            known.update(tracking.of_records(self.connection, name, missing, lock=False))

    @staticmethod
    def _natural_key(change: _Change) -> str | None:
        receiver = receiver_of(change.obj)
        if not receiver.match_on or change.deleted or change.record_id is None:
            return None
        return change.natural

    def _natural_tombstones(self, changes: list[_Change]) -> None:
        """A new record of a ``match_on`` model whose key belonged to a
        record deleted here inherits that delete's clock: it comes after it."""
        digests: dict[str, set[str]] = defaultdict(set)
        for change in changes:
            receiver = receiver_of(change.obj)
            if (receiver.match_on and not change.deleted and change.record_id is not None
                    and change.record_id not in self.tracked.get(receiver.name, {})):
                key = change.natural
                if key is not None:
                    digests[receiver.name].add(key)
        for name, found in digests.items():
            self.natural_clocks[name].update(
                tracking.natural_tombstones(self.connection, name, found))

    def stage(self, change: _Change) -> dict[str, Any] | None:
        """The outbound row for one change (None: nothing to send)."""
        receiver = receiver_of(change.obj)
        name = receiver.name
        if change.deleted:
            return self._delete(receiver, change.obj, change.record_id)
        values = change.values
        if receiver.keyed and change.record_id is not None:
            self.key_texts[name][change.record_id] = keys.text_of(receiver, change.obj)
        if change.record_id is None:  # never flushed: sent without identity, untracked
            version = _first_version(values)
            identity = (None, None)
        else:
            tracked = self.tracked.setdefault(name, {}).get(change.record_id)
            writes = self.writes[name]
            if tracked is None:
                # First publish: the record gets its own identity, in a new
                # life if a deleted record of ours had the same id.
                old = self.tombstones[name].get(change.record_id)
                clock = {}
                if receiver.match_on:
                    same_key = self.natural_clocks[name].get(change.natural)
                    clock = dict(same_key.clock) if same_key else clock
                life = old[1] + 1 if old else 0
                tracked = tracking.Tracked(name, change.record_id, [(HERE, change.record_id)],
                                           Version(clock=clock),
                                           {(HERE, change.record_id): life})
                self.tracked[name][change.record_id] = tracked
                kind = 'revived' if old else 'created'
                writes[kind][change.record_id] = tracked.version
                tracked.version.edit(_fingerprints(values))
            elif tracked.version.edit(_fingerprints(values)):
                if not any(change.record_id in writes[k] for k in ('created', 'revived')):
                    writes['changed'][change.record_id] = tracked.version
            version = tracked.version
            identity = tracked.identity
        return self._row(name, values, identity,
                         self._refs(receiver.references(type(change.obj)), values), version,
                         tracked.life if change.record_id is not None else 0, receiver.keyed)

    def _delete(self, receiver: Receiver, obj: object,
                record_id: int | None) -> dict[str, Any] | None:
        if not receiver.deletes:
            raise ValueError(f'{receiver.name} does not publish deletes: '
                             f'receives_from({receiver.name!r}, deletes=True)')
        tracked = self.tracked.get(receiver.name, {}).pop(record_id, None)
        if tracked is None:
            return None  # never sent anywhere: nobody else holds it
        tracked.version.delete()
        writes = self.writes[receiver.name]
        refs = self._refs(receiver.references(type(obj)),
                          {key: getattr(obj, key) for key in receiver.match_on}) \
            if receiver.keyed else None
        for kind in ('created', 'revived', 'changed'):
            writes[kind].pop(record_id, None)
        writes['buried'][record_id] = tracked.version
        key_values = {key: getattr(obj, key) for key in receiver.match_on}
        self.natural[receiver.name][record_id] = natural_key(receiver, key_values)
        # The body names the natural key: the peer may hold the same record
        # under another identity.
        return self._row(receiver.name, key_values, tracked.identity, refs, tracked.version,
                         tracked.life, receiver.keyed)

    def _refs(self, references: dict[str, Receiver], values: dict[str, Any]) -> str | None:
        """JSON of the identities the record's foreign keys point at."""
        refs = {}
        for key, target in references.items():
            value = values.get(key)
            if value is not None:
                tracked = self.tracked.get(target.name, {}).get(value)
                refs[key] = list(tracked.identity) if tracked else [None, value]
        return _compact(refs) if refs else None

    @staticmethod
    def _row(name: str, values: dict[str, Any], identity: tuple, refs: str | None,
             version: Version, life: int, keyed: bool = False) -> dict[str, Any]:
        return {'body': encode_body(name, values), 'origin': identity[0],
                'original_id': identity[1], 'refs': refs,
                'version': _compact(to_wire(version, HERE, life)),
                'format': wire.KEYED_FORMAT if keyed else wire.RECORD_FORMAT,
                'created_at': utcnow()}

    def write(self) -> None:
        for name, writes in self.writes.items():
            tracked = self.tracked.get(name, {})
            tracking.write_versions(
                self.connection, name, list(writes['created'].items()),
                [(i, v, tracked[i].life if i in tracked else 0)
                 for i, v in writes['revived'].items()],
                list(writes['changed'].items()), list(writes['buried'].items()),
                self.key_texts.get(name))
            tracking.bury_natural(self.connection, name, {
                key: writes['buried'][i] for i, key in self.natural[name].items()
                if key is not None and i in writes['buried']})


def _fingerprints(values: dict[str, Any]) -> dict[str, str]:
    return {key: fingerprint(value) for key, value in values.items()}


def _first_version(values: dict[str, Any]) -> Version:
    """The version of a record's first publish (no earlier life, no
    deleted natural key to come after): one edit of every attribute."""
    version = Version()
    version.edit(_fingerprints(values))
    return version


def _publish_changes(connection: Connection, changes: list[_Change]) -> list[dict[str, Any]]:
    """Stamp the changes, write the records' new versions, and return the
    outbound rows to insert, in the order of ``changes``."""
    staging = _Staging(connection)
    staging.load(changes)
    rows = [row for row in map(staging.stage, changes) if row is not None]
    staging.write()
    return rows


_INSERT_OUTBOUND = outbound_messages.insert()


def _insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
    """One INSERT for all rows (executemany, which SQLAlchemy sends as
    multi-row statements): the messages take their ids, and so their place
    on the wire, in this order."""
    if rows:
        connection.execute(_INSERT_OUTBOUND, rows)


def _publish_one(session: Session, change: _Change) -> OutboundMessage | None:
    # A Core insert, not session.add: the message takes its id, and so its
    # place on the wire, now, in publishing order (also among autopublished
    # ones), without flushing anything else of the caller's.
    connection = session.connection()
    rows = _publish_changes(connection, [change])
    if not rows:
        return None
    message_id = connection.execute(outbound_messages.insert().values(rows[0])) \
        .inserted_primary_key[0]
    mark_changed(session)
    with session.no_autoflush:
        return session.get(OutboundMessage, message_id)


def _record_id(obj: object) -> int | None:
    receiver = receiver_of(obj)
    found = keys.handle(receiver, obj)
    if found is None and receiver.keyed:
        # Sent without its key, it would get another one on the other side.
        raise ValueError(f'{receiver.name} has no primary key yet, which is its identity: '
                         'flush the session before publishing it')
    return found


def publish(session: Session, obj: object) -> OutboundMessage:
    """Enqueue ``obj``'s current state for the peer, in ``session``'s
    current transaction: if that transaction aborts, the message is gone
    with the change.

    The attributes that changed since the record was last published or
    received get a new version stamp.  A record that was never flushed is
    published without identity; the receiver then creates a new record
    with its own id (as the gem did).

    Its many-to-many collections (:mod:`.links`) send how they differ from
    what was last sent or received, as link messages after it.
    """
    message = _publish_one(session, _Change(obj, _record_id(obj)))
    links.publish_links(session, obj)  # its many-to-many links, after it
    return message


def publish_delete(session: Session, obj: object) -> OutboundMessage | None:
    """Enqueue the deletion of ``obj`` (deleted in this transaction, before
    or after this call), for a model registered with ``deletes=True``.

    The peer deletes its copy and keeps a tombstone.  A record that was
    never published has no copy elsewhere: nothing is sent (None).
    """
    return _publish_one(session, _Change(obj, _record_id(obj), deleted=True))


def publish_records(session: Session, objs: Iterable[object]) -> int:
    """Publish the current state of each of ``objs`` (persistent records),
    in this order and in ``session``'s transaction; returns how many."""
    connection = session.connection()
    objs = list(objs)
    rows = _publish_changes(connection, [_Change(obj, _record_id(obj)) for obj in objs])
    _insert(connection, rows)
    if rows:
        mark_changed(session)
    for obj in objs:
        links.publish_links(session, obj)
    return len(rows)


# -- autopublish ----------------------------------------------------------------
#
# Mapper events only note what changed, in the order the flush writes it;
# one after_flush hook per session publishes it all at once.

PENDING = 'pyramid_communicator.pending'


def _publishing_session(target: object) -> Session | None:
    """The session whose flush publishes ``target``: None outside a session,
    and for one that applies received messages (they are not echoed back)."""
    session = object_session(target)
    if session is None or session.info.get(APPLYING):
        return None
    return session


def _note(session: Session, mapper: Any, target: object, deleted: bool) -> None:
    record_id = _record_id(target)
    new = inspect(target).identity is None
    if record_id is None and len(mapper.primary_key) == 1:
        # after_insert runs before the session assigns the identity key;
        # the new primary key is already in the instance's dict.
        record_id = mapper.primary_key_from_instance(target)[0]
    session.info.setdefault(PENDING, []).append(_Change(target, record_id, deleted,
                                                        new and not deleted))


def _autopublish(mapper: Any, connection: Connection, target: object) -> None:
    session = _publishing_session(target)
    if session is None:
        return
    state = inspect(target)
    if state.has_identity and not _changed(state, receiver_of(target)):
        return
    _note(session, mapper, target, deleted=False)


def _autopublish_delete(mapper: Any, connection: Connection, target: object) -> None:
    session = _publishing_session(target)
    if session is not None:
        _note(session, mapper, target, deleted=True)


def _before_flush(session: Session, flush_context: Any, instances: Any) -> None:
    session.info.pop(PENDING, None)  # what a failed flush noted is not published


def _after_flush(session: Session, flush_context: Any) -> None:
    changes = session.info.pop(PENDING, None)
    if changes:
        connection = session.connection()
        if not _published_as_new(connection, changes):
            _insert(connection, _publish_changes(connection, changes))


def _published_as_new(connection: Connection, changes: list[_Change]) -> bool:
    """Publish the flush in one statement if it inserted just one record,
    optimistically taking that record for new to the sync metadata (the
    common request: one record created); False, with nothing written, if
    it was not (an id handed out again, a natural key deleted before).

    PostgreSQL only: its round trips are what such a request pays for, and
    it can write the identity and the message in one statement.  The
    lookup that the optimism skips is needed for records whose synced
    foreign keys point somewhere (their refs)."""
    if len(changes) != 1 or connection.dialect.name != 'postgresql':
        return False
    change = changes[0]
    receiver = receiver_of(change.obj)
    if (not change.new or change.record_id is None or receiver.keyed
            or any(change.values.get(key) is not None
                   for key in receiver.references(type(change.obj)))):
        return False
    version = _first_version(change.values)
    row = _Staging._row(receiver.name, change.values, (None, change.record_id), None,
                        version, 0)
    return tracking.create_with_message(connection, receiver.name, change.record_id, version,
                                        change.natural, row) is not None


def _listen_to_sessions() -> None:
    if not event.contains(Session, 'after_flush', _after_flush):
        event.listen(Session, 'before_flush', _before_flush)
        event.listen(Session, 'after_flush', _after_flush)


def _changed(state: Any, receiver: Receiver) -> bool:
    """Did any attribute that crosses the wire change in this flush?"""
    return any(state.attrs[key].history.has_changes()
               for key in receiver.columns(state.class_))

