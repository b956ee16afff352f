"""Applying one received message to the local records.

The message's identity names the record; the peer must be allowed to do
what it asks (``receives_from(accept=...)``, and a record of ours must
have been sent to it); the message's version is merged with ours
attribute by attribute, and concurrent edits are settled by the model's
policy and recorded.  Tombstones keep deleted records deleted.

A message without a version (from the Ruby gem) is applied as the gem
did: its values overwrite ours.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import conflicts, tracking
from .conflicts import Conflict, Custom, Edit
from .records import (
    Receiver,
    decode_body,
    fingerprint,
    from_wire,
    local_id,
    receiver_for,
    to_wire,
)
from .versions import HERE, Incoming, Stamp, Version, covered, merge_clocks, named
from .versions import from_wire as version_from_wire


class Refused(Exception):
    """The peer may not do this.  The message is kept with the reason and
    not retried, unless an operator names it in ``pcommunicate --retry``."""


@dataclasses.dataclass(frozen=True)
class Message:
    sender: str
    body: str
    origin: str | None
    original_id: int | None
    refs: dict[str, list] | None = None
    version: dict[str, Any] | None = None


def apply_message(session: Session, local_name: str, message: Message) -> object | None:
    """Apply ``message`` in ``session``'s transaction; returns the local
    record written (None when nothing was: a stale update, a delete)."""
    name, attributes = decode_body(message.body)
    application = _Application(session, local_name, receiver_for(name), message)
    if application.incoming is not None and application.incoming.deleted is not None:
        return application.delete()
    return application.upsert(attributes)


def _order(stamp: Stamp | None) -> tuple[int, str]:
    return (-1, '') if stamp is None else stamp


class _Application:
    def __init__(self, session: Session, local_name: str, receiver: Receiver,
                 message: Message) -> None:
        self.session = session
        self.connection = session.connection()
        self.local_name = local_name
        self.receiver = receiver
        self.name = receiver.name
        self.message = message
        self.incoming: Incoming | None = (
            version_from_wire(message.version, local_name) if message.version else None)
        self.key: tuple[str, int] | None = None
        if message.original_id is not None:
            own = message.origin in (None, local_name)
            self.key = (HERE if own else message.origin, message.original_id)

    # -- checks --------------------------------------------------------------

    def require(self, operation: str) -> None:
        if operation not in self.receiver.accept:
            hint = ' (receives_from(..., deletes=True))' if operation == 'delete' else ''
            raise Refused(f'{self.name} does not accept {operation}s from '
                          f'{self.message.sender}{hint}')

    def find(self) -> Any:
        """The identity's row; refused for a record of ours never sent out."""
        if self.key is None:
            return None
        row = tracking.find(self.connection, self.name, *self.key)
        if row is None and self.key[0] == HERE:
            raise Refused(f'{self.message.sender} addressed {self.name} {self.key[1]} of '
                          f'{self.local_name}, which was never sent to it')
        return row

    # -- upsert --------------------------------------------------------------

    def upsert(self, attributes: dict[str, Any]) -> object | None:
        row = self.find()
        if row is not None and row.local_id is None:
            return self.against_tombstone(row, attributes)
        obj = tracked = None
        if row is not None:
            obj = self.session.get(self.receiver.cls, row.local_id, with_for_update=True)
            if obj is None and self.key[0] == HERE:
                raise LookupError(f'{self.name} {self.key[1]} of {self.local_name} '
                                  'does not exist here')
        if obj is not None:
            self.require('update')
            tracked = tracking.of_record(self.connection, self.name, row.local_id)
        else:
            self.require('create')
            obj = self.match(attributes)
            if obj is not None:
                tracked = tracking.of_record(self.connection, self.name, local_id(obj))
        created = obj is None
        if created:
            obj = self.receiver.cls()
        local = tracked.version if tracked is not None else Version()
        version = self.merge(obj, local, attributes, created)
        if created:
            self.session.add(obj)
        try:
            self.session.flush()
        except IntegrityError as exc:
            if created and not self.receiver.match_on:
                exc.add_note(f'a {self.name} created on {self.message.sender} may have the '
                             'unique key of a local one: receives_from(..., match_on=[...]) '
                             'takes them as the same record')
            raise
        self.track(obj, row, version)
        return obj

    def track(self, obj: object, row: Any, version: Version) -> None:
        record_id = local_id(obj)
        stored = version if self.incoming is not None else None
        if self.key is not None and (row is None or row.local_id != record_id):
            tracking.add_identity(self.connection, self.name, *self.key, record_id, stored)
        if stored is not None:
            tracking.save(self.connection, self.name, record_id, stored)

    def match(self, attributes: dict[str, Any]) -> object | None:
        """The local record with the same natural key (``match_on``)."""
        if not self.receiver.match_on:
            return None
        columns = self.receiver.columns()
        criteria = []
        for key in self.receiver.match_on:
            value = from_wire(columns[key], attributes.get(key))
            if value is None:
                return None
            criteria.append(getattr(self.receiver.cls, key) == value)
        statement = select(self.receiver.cls).where(*criteria).limit(1)
        return self.session.scalars(statement.with_for_update()).first()

    def value(self, key: str, wire_value: Any) -> Any:
        """The local Python value for an attribute; a foreign key to a
        synced model points at our copy of the record the sender meant."""
        refs = self.message.refs or {}
        target = self.receiver.references().get(key)
        if target is not None and key in refs and wire_value is not None:
            return self.resolve(target, *refs[key])
        return from_wire(self.receiver.columns()[key], wire_value)

    def resolve(self, target: Receiver, origin: str, original_id: int) -> int:
        own = origin == self.local_name
        row = tracking.find(self.connection, target.name, HERE if own else origin,
                            original_id)
        if row is not None and row.local_id is not None:
            return row.local_id
        if own and row is None:
            raise Refused(f'{self.message.sender} refers to {target.name} {original_id} of '
                          f'{self.local_name}, which was never sent to it')
        raise LookupError(f'refers to {target.name} {original_id} of {origin}, '
                          'which is not here (yet)')

    def merge(self, obj: object, local: Version, attributes: dict[str, Any],
              created: bool) -> Version:
        """Write the attributes the message wins into ``obj``; the merged version."""
        incoming = self.incoming
        version = Version(clock=merge_clocks(local.clock, incoming.clock if incoming else {}),
                          stamps=dict(local.stamps))
        columns = self.receiver.columns()
        values = dict(attributes)
        for key, (_, ref_id) in (self.message.refs or {}).items():
            values.setdefault(key, ref_id)  # whom the key means, also if the body lacks it
        for key, wire_value in values.items():
            if key not in columns:
                continue
            remote = self.value(key, wire_value)
            if incoming is None or created:
                setattr(obj, key, remote)
                if incoming is not None and key in incoming.stamps:
                    version.stamps[key] = (*incoming.stamps[key], fingerprint(remote))
                continue
            s_in, s_loc = incoming.stamps.get(key), local.stamp(key)
            if s_in == s_loc or s_in is None:
                continue
            seen_here, seen_there = covered(s_in, local.clock), covered(s_loc, incoming.clock)
            if seen_here and not seen_there:
                continue  # ours is newer: the message is stale for this attribute
            current = getattr(obj, key)
            if not seen_here and not seen_there and fingerprint(current) != fingerprint(remote):
                kept, stamp = self.settle(obj, key, current, remote, s_loc, s_in)
                setattr(obj, key, kept)
                version.stamps[key] = (*stamp, fingerprint(kept))
                continue
            # Newer than ours, or the same value written on both sides: the
            # greater stamp stays, so that both sides keep the same one.
            if (seen_there and not seen_here) or (
                    _order(named(s_in, self.local_name)) > _order(named(s_loc, self.local_name))):
                setattr(obj, key, remote)
                version.stamps[key] = (*s_in, fingerprint(remote))
        return version

    def settle(self, obj: object, key: str, current: Any, remote: Any,
               s_loc: Stamp | None, s_in: Stamp) -> tuple[Any, Stamp]:
        """Concurrent edits of one attribute: what the policy keeps, recorded."""
        policy = self.receiver.policy
        loc_named = named(s_loc, self.local_name) or (0, self.local_name)
        in_named = named(s_in, self.local_name)
        mine = Edit(current, loc_named[1], loc_named[0])
        theirs = Edit(remote, in_named[1], in_named[0])
        older, newer = sorted((mine, theirs), key=lambda e: (e.hlc, e.app))
        conflict = Conflict(self.name, key, older, newer)
        kept = policy.value(conflict)
        newer_stamp = s_in if newer is theirs else s_loc
        if isinstance(policy, Custom):
            winner, stamp = 'merged', newer_stamp or s_in
            if fingerprint(kept) == fingerprint(current):
                winner = 'local'
            elif fingerprint(kept) == fingerprint(remote):
                winner = 'remote'
        else:
            won = policy.winner(conflict)
            winner, stamp = ('remote', s_in) if won is theirs else ('local', s_loc or s_in)
        self.record(obj, key, current, remote, s_loc, s_in, winner, kept)
        return kept, stamp

    def record(self, obj: object | None, attribute: str | None, local: Any, remote: Any,
               s_loc: Stamp | None, s_in: Stamp | None, winner: str, kept: Any) -> None:
        conflicts.record(
            self.connection, name=self.name,
            origin=self.message.origin or self.local_name,
            original_id=self.message.original_id,
            local_id=None if obj is None else local_id(obj), attribute=attribute,
            local=to_wire(local), remote=to_wire(remote),
            local_stamp=named(s_loc, self.local_name),
            remote_stamp=named(s_in, self.local_name), winner=winner, kept=to_wire(kept),
            peer=self.message.sender, policy=self.receiver.policy)

    # -- tombstones and deletes ---------------------------------------------

    def against_tombstone(self, row: Any, attributes: dict[str, Any]) -> object | None:
        """An update for a record deleted here."""
        incoming = self.incoming
        tomb = Version.loads(row.version)
        if incoming is None:
            return None  # the gem knows no deletes: the record stays deleted
        if not covered(tomb.deleted, incoming.clock):
            newer = [s for s in incoming.stamps.values() if not covered(s, tomb.clock)]
            if not newer:
                return None  # stale: made before the delete, and already seen
            deleter = named(tomb.deleted, self.local_name)
            apps = {named(s, self.local_name)[1] for s in newer}
            survives = self.receiver.policy.update_beats_delete(apps, deleter[1])
            self.record(None, None, 'deleted', {k: v for k, v in attributes.items()},
                        deleter, max(newer), 'remote' if survives else 'local',
                        attributes if survives else 'deleted')
            if not survives:
                tomb.clock = merge_clocks(tomb.clock, incoming.clock)
                tracking.set_tombstone(self.connection, row.id, tomb)
                return None
        # Made after the delete was seen (a new life), or the policy says
        # the update survives: the record is created again.
        self.require('create')
        obj = self.receiver.cls()
        version = self.merge(obj, Version(clock=tomb.clock), attributes, created=True)
        self.session.add(obj)
        self.session.flush()
        tracking.add_identity(self.connection, self.name, *self.key, local_id(obj), version)
        return obj

    def delete(self) -> None:
        self.require('delete')
        if self.key is None:
            raise ValueError('a delete needs the identity of the record (origin, original_id)')
        incoming = self.incoming
        row = self.find()
        if row is None or row.local_id is None:
            # Never here, or deleted already: keep (or extend) the tombstone
            # so that a late create or update does not bring it back.
            tomb = Version.loads(row.version) if row is not None else Version()
            tomb.clock = merge_clocks(tomb.clock, incoming.clock)
            tomb.deleted = tomb.deleted or incoming.deleted
            tomb.stamps = {}
            tracking.add_identity(self.connection, self.name, *self.key, None, tomb)
            return None
        obj = self.session.get(self.receiver.cls, row.local_id, with_for_update=True)
        tracked = tracking.of_record(self.connection, self.name, row.local_id)
        local = tracked.version if tracked is not None else Version()
        concurrent = [(s[0], s[1]) for s in local.stamps.values()
                      if not covered((s[0], s[1]), incoming.clock)]
        deleter = named(incoming.deleted, self.local_name)
        if concurrent:
            apps = {named(s, self.local_name)[1] for s in concurrent}
            survives = self.receiver.policy.update_beats_delete(apps, deleter[1])
            state = None if obj is None else _wire_state(self.receiver, obj)
            self.record(obj, None, state, 'deleted', max(concurrent), deleter,
                        'local' if survives else 'remote', state if survives else 'deleted')
            if survives:
                local.clock = merge_clocks(local.clock, incoming.clock)
                tracking.save(self.connection, self.name, row.local_id, local)
                return None
        if obj is not None:
            self.session.delete(obj)
            self.session.flush()
        tracking.bury(self.connection, self.name, row.local_id,
                      Version(clock=merge_clocks(local.clock, incoming.clock),
                              deleted=incoming.deleted))
        return None


def _wire_state(receiver: Receiver, obj: object) -> dict[str, Any]:
    return {key: to_wire(getattr(obj, key)) for key in receiver.columns()}
