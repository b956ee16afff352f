"""Publishing: a change of a synced record becomes a message in the
outbound queue, in the transaction that made the change (the
transactional outbox), stamped with a new version of the record.

``receives_from`` registers a model and, with ``autopublish``, listens to
its mapper events; ``publish`` and ``publish_delete`` do it by hand.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from sqlalchemy import event, inspect
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session, object_session
from zope.sqlalchemy import mark_changed

from . import tracking
from .conflicts import Conflict, Policy, as_policy
from .models import OutboundMessage, outbound_messages, utcnow
from .records import (
    APPLYING,
    OPERATIONS,
    Receiver,
    encode_body,
    fingerprint,
    local_id,
    receiver_of,
    record_values,
    register,
)
from .versions import HERE, Version, to_wire

T = TypeVar('T', bound=type)


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
        columns = receiver.columns()
        missing = [key for key in match_on if key not in columns]
        if missing:
            raise ValueError(f'match_on {missing} of {name!r}: not attributes that cross '
                             'the wire')
        register(receiver)
        if autopublish and not event.contains(cls, 'after_insert', _autopublish):
            event.listen(cls, 'after_insert', _autopublish)
            event.listen(cls, 'after_update', _autopublish)
        if autopublish and deletes and not event.contains(cls, 'after_delete',
                                                           _autopublish_delete):
            event.listen(cls, 'after_delete', _autopublish_delete)
        return cls
    return decorate


def _refs(connection: Connection, receiver: Receiver, values: dict[str, Any]) -> str | None:
    """JSON of the identities the record's foreign keys point at."""
    refs = {}
    for key, target in receiver.references().items():
        value = values.get(key)
        if value is not None:
            tracked = tracking.of_record(connection, target.name, value, lock=False)
            refs[key] = list(tracked.identity) if tracked else [None, value]
    return json.dumps(refs, separators=(',', ':')) if refs else None


def _stage(connection: Connection, receiver: Receiver, record_id: int | None,
           values: dict[str, Any]) -> tuple[str | None, int | None, Version]:
    """Stamp this change in the record's version; (origin, original_id,
    version) of the message to send."""
    if record_id is None:  # never flushed: sent without identity, untracked
        version = Version()
        version.edit({key: fingerprint(value) for key, value in values.items()})
        return None, None, version
    tracked = tracking.of_record(connection, receiver.name, record_id)
    if tracked is None:
        # First publish: the record gets its own identity.  An old
        # tombstone of the same id (a database that reuses ids) hands on
        # its clock, so the new record's edits are later than the delete.
        tomb = tracking.find(connection, receiver.name, HERE, record_id, lock=True)
        version = Version(clock=Version.loads(tomb.version).clock) if tomb else Version()
        tracked = tracking.Tracked(receiver.name, record_id, [(HERE, record_id)], version)
        changed = version.edit({key: fingerprint(value) for key, value in values.items()})
        tracking.add_identity(connection, receiver.name, HERE, record_id, record_id, version)
    else:
        version = tracked.version
        changed = version.edit({key: fingerprint(value) for key, value in values.items()})
        if changed:
            tracking.save(connection, receiver.name, record_id, version)
    origin, original_id = tracked.identity
    return origin, original_id, version


def _enqueue(connection: Connection, receiver: Receiver, body: str, origin: str | None,
             original_id: int | None, refs: str | None, version: Version) -> int:
    result = connection.execute(outbound_messages.insert().values(
        body=body, origin=origin, original_id=original_id, refs=refs,
        version=json.dumps(to_wire(version, HERE), separators=(',', ':')),
        created_at=utcnow()))
    return result.inserted_primary_key[0]


def _publish(connection: Connection, obj: object, record_id: int | None) -> int:
    receiver = receiver_of(obj)
    values = record_values(obj)
    origin, original_id, version = _stage(connection, receiver, record_id, values)
    return _enqueue(connection, receiver, encode_body(receiver.name, values), origin,
                    original_id, _refs(connection, receiver, values), version)


def publish(session: Session, obj: object) -> OutboundMessage:
    """Enqueue ``obj``'s current state for the peer, in ``session``'s
    current transaction: if that transaction aborts, the message is gone
    with the change.

    The attributes that changed since the record was last published or
    received get a new version stamp.  A record that was never flushed is
    published without identity; the receiver then creates a new record
    with its own id (as the gem did).
    """
    # A Core insert, not session.add: the message takes its id, and so its
    # place on the wire, now, in publishing order (also among autopublished
    # ones), without flushing anything else of the caller's.
    message_id = _publish(session.connection(), obj, local_id(obj))
    mark_changed(session)
    with session.no_autoflush:
        return session.get(OutboundMessage, message_id)


def _delete(connection: Connection, obj: object, record_id: int | None) -> int | None:
    receiver = receiver_of(obj)
    if not receiver.deletes:
        raise ValueError(f'{receiver.name} does not publish deletes: '
                         f'receives_from({receiver.name!r}, deletes=True)')
    tracked = None if record_id is None else tracking.of_record(
        connection, receiver.name, record_id)
    if tracked is None:
        return None  # never sent anywhere: nobody else holds it
    tracked.version.delete()
    tracking.bury(connection, receiver.name, record_id, tracked.version)
    origin, original_id = tracked.identity
    return _enqueue(connection, receiver, encode_body(receiver.name, {}), origin,
                    original_id, None, tracked.version)


def publish_delete(session: Session, obj: object) -> OutboundMessage | None:
    """Enqueue the deletion of ``obj`` (deleted in this transaction, before
    or after this call), for a model registered with ``deletes=True``.

    The peer deletes its copy and keeps a tombstone.  A record that was
    never published has no copy elsewhere: nothing is sent (None).
    """
    message_id = _delete(session.connection(), obj, local_id(obj))
    if message_id is None:
        return None
    mark_changed(session)
    with session.no_autoflush:
        return session.get(OutboundMessage, message_id)


def _applying(target: object) -> bool:
    session = object_session(target)
    return session is not None and bool(session.info.get(APPLYING))


def _autopublish(mapper: Any, connection: Connection, target: object) -> None:
    if _applying(target):
        return
    state = inspect(target)
    receiver = receiver_of(target)
    if state.has_identity and not _changed(state, receiver):
        return
    record_id = local_id(target)
    if record_id is None and len(mapper.primary_key) == 1:
        # after_insert runs before the session assigns the identity key;
        # the new primary key is already in the instance's dict.
        record_id = mapper.primary_key_from_instance(target)[0]
    _publish(connection, target, record_id)


def _autopublish_delete(mapper: Any, connection: Connection, target: object) -> None:
    if _applying(target):
        return
    _delete(connection, target, local_id(target))


def _changed(state: Any, receiver: Receiver) -> bool:
    """Did any attribute that crosses the wire change in this flush?"""
    return any(state.attrs[key].history.has_changes() for key in receiver.columns())


def publish_records(session: Session, objs: Iterable[object]) -> int:
    """Publish the current state of each of ``objs`` (persistent records),
    in this order and in ``session``'s transaction; returns how many."""
    connection = session.connection()
    count = 0
    for obj in objs:
        _publish(connection, obj, local_id(obj))
        count += 1
    if count:
        mark_changed(session)
    return count
