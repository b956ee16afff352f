"""Applying one received message to the local records.

The message's identity names the record; the peer must be allowed to do
what it asks (``receives_from(accept=...)``, and a record of ours must
have been sent to it); the message's version is merged with ours
attribute by attribute, and concurrent edits are settled by the model's
policy and recorded.  Tombstones keep deleted records deleted.

A message without a version (from the Ruby gem) is applied as the gem
did: its values overwrite ours.

Reads and writes of records and of their sync metadata go through the
batch's :class:`.working_set.WorkingSet`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from . import conflicts, keyrefs, keys, trust
from .conflicts import Conflict, Custom, Edit
from .records import (
    Receiver,
    decode_body,
    fingerprint,
    from_wire,
    natural_key,
    receiver_for,
    to_wire,
)
from .trust import Refused
from .versions import (
    FUTURE_LIMIT,
    HERE,
    Incoming,
    Stamp,
    Version,
    covered,
    latest_hlc,
    merge_clocks,
    named,
    now_hlc,
)
from .versions import from_wire as version_from_wire
from .working_set import Identity, WorkingSet

__all__ = ['Message', 'Refused', 'apply_message']


@dataclasses.dataclass(frozen=True)
class Message:
    sender: str
    body: str
    origin: str | None
    original_id: int | None
    refs: dict[str, list] | None = None
    version: dict[str, Any] | None = None
    #: The origin's signature (:mod:`.signatures`): an echo if the origin is us.
    signature: str | None = None
    #: ``decode_body(body)`` if the caller has it already (read only).
    decoded: tuple[str, dict[str, Any]] | None = dataclasses.field(default=None, compare=False,
                                                                   repr=False)

    def decode(self) -> tuple[str, dict[str, Any]]:
        return self.decoded if self.decoded is not None else decode_body(self.body)


def apply_message(work: WorkingSet, message: Message) -> object | None:
    """Apply ``message`` to the working set; returns the local record
    written (None when nothing was: a stale update, a delete)."""
    name, attributes = message.decode()
    application = _Application(work, receiver_for(name), message)
    if application.incoming is None and not work.gem_peer:
        # Our apps always send versions: one without could only be forged,
        # to overwrite what no version check would let through.
        raise Refused(f'{message.sender} sent a message without a version, which only a '
                      'gem peer may (communicator.gem_peer)')
    if application.incoming is not None and \
            latest_hlc(application.incoming) > now_hlc() + FUTURE_LIMIT:
        raise Refused(f'the version {message.sender} sent is more than a day ahead of '
                      "this host's clock")
    if application.incoming is not None and application.incoming.deleted is not None:
        return application.delete(attributes)
    return application.upsert(attributes)


def _order(stamp: Stamp | None) -> tuple[int, str]:
    return (-1, '') if stamp is None else stamp


class _Application:
    def __init__(self, work: WorkingSet, receiver: Receiver, message: Message) -> None:
        self.work = work
        self.local_name = work.local_name
        self.receiver = receiver
        self.name = receiver.name
        self.message = message
        self.incoming: Incoming | None = (
            version_from_wire(message.version, self.local_name) if message.version else None)
        #: The life of the identity the message addresses (see .versions).
        self.life = self.incoming.life if self.incoming is not None else 0
        self.key: tuple[str, int] | None = None
        if message.original_id is not None:
            own = message.origin in (None, self.local_name)
            self.key = (HERE if own else message.origin, message.original_id)

    # -- checks --------------------------------------------------------------

    def require(self, operation: str) -> None:
        if operation not in self.receiver.accept:
            hint = ' (receives_from(..., deletes=True))' if operation == 'delete' else ''
            raise Refused(f'{self.name} does not accept {operation}s from '
                          f'{self.message.sender}{hint}')

    def believe(self, local: Version | None, record: object | None = None,
                identity: Identity | None = None) -> None:
        """Check the message's version against ours (:mod:`.trust`): what
        it claims of this app may not go past what was delivered."""
        incoming = self.incoming
        if incoming is None:
            return
        undelivered = None
        if incoming.clock.get(HERE) or any(app == HERE for _, app in incoming.stamps.values()):
            undelivered = self.work.undelivered(record, identity)
        trust.check_version(incoming, local, self.message.sender, self.local_name,
                            undelivered)

    def shared(self, record: object) -> None:
        """A local record found by its natural key: the peer may touch it
        only if it knows it (an identity: sent to it, or received from it)."""
        if not self.work.aliases.get(id(record)):
            held = keys.text_of(self.receiver, record) if self.receiver.keyed else \
                self.work.local_id(record)
            raise Refused(f'{self.message.sender} sent a {self.name} whose '
                          f'{", ".join(self.receiver.match_on)} matches {self.name} '
                          f'{held} of {self.local_name}, which was never sent to it')

    def natural(self, attributes: dict[str, Any]) -> dict[str, Any]:
        """The message's attributes with the parts of its natural key (a
        keyed model's primary key) that are foreign keys to synced models
        pointing at our copies: a key is compared as it is here.  A part
        pointing at a record of ours never shared with the peer is refused
        (:meth:`resolve`), one not here yet fails and is retried."""
        references = self.receiver.references()
        refs = self.message.refs or {}
        found = dict(attributes)
        for key in self.receiver.match_on:
            if key not in references or attributes.get(key) is None:
                continue
            ref = refs.get(key)
            if not isinstance(ref, list) or len(ref) != 2:
                raise Refused(f'{self.message.sender} sent {self.name}.{key} without '
                              'saying whom it refers to (refs)')
            found[key] = self.resolve(references[key], *ref)
        if self.receiver.keyed:
            values = self.key_of(found)
            if values is None:
                raise Refused(f'{self.message.sender} sent a {self.name} without its key '
                              f'({", ".join(self.receiver.match_on)}), which is its identity')
            try:
                keys.text(values)
            except keys.BadKey as exc:
                raise Refused(f'{self.message.sender} sent a {self.name} whose {exc}') \
                    from None
        return found

    def key_of(self, natural: dict[str, Any]) -> tuple | None:
        """A keyed message's key values as Python values (None: not sent)."""
        columns = self.receiver.columns()
        values = tuple(from_wire(columns[key], natural.get(key), self.work.dialect)
                       for key in self.receiver.match_on)
        return None if any(value is None for value in values) else values

    def same_key(self, record: object, attributes: dict[str, Any]) -> None:
        """A keyed record's key never changes: an identity naming another
        key than its record's is refused (it could take over that key)."""
        if not self.receiver.keyed:
            return
        sent = self.key_of(self.natural(attributes))
        held = keys.values_of(self.receiver, record)
        if sent is not None and held is not None and keys.text(sent) != keys.text(held):
            raise Refused(f'{self.message.sender} sent {self.name} {self.key[1]} with the key '
                          f'{keys.text(sent)[:60]}, but that record has the key '
                          f'{keys.text(held)[:60]} here: keys never change')

    def find(self) -> Identity | None:
        """The identity's row; refused for a record of ours never sent out."""
        if self.key is None:
            return None
        identity = self.work.find(self.name, *self.key)
        if identity is None and self.key[0] == HERE:
            raise Refused(f'{self.message.sender} addressed {self.name} {self.key[1]} of '
                          f'{self.local_name}, which was never sent to it')
        return identity

    # -- upsert --------------------------------------------------------------

    def upsert(self, attributes: dict[str, Any]) -> object | None:
        identity = self.find()
        previous = previous_identity = None  # an earlier life of the identity
        if identity is not None and self.incoming is not None:
            known = identity.life
            if self.life < known:
                return None  # about a record that had this id before: it is gone
            if self.life > known:  # a new record under a reused id
                trust.check_life(self.life, known, self.key[0], self.message.sender,
                                 self.local_name)
                previous = identity.version or (
                    self.work.version_of(identity.record) if identity.record is not None
                    else None)
                self.reuse(identity)
                previous_identity, identity = identity, None
        if identity is not None and identity.tombstone:
            return self.against_tombstone(identity, attributes)
        record = identity.record if identity is not None else None
        if identity is not None and record is None and self.key[0] == HERE:
            raise LookupError(f'{self.name} {self.key[1]} of {self.local_name} '
                              'does not exist here')
        if record is not None:
            self.require('update')
            self.same_key(record, attributes)
            self.same_kind(record, attributes)
            self.believe(self.work.version_of(record), record)
        else:
            self.require('create')
            if self.key is not None and identity is None:
                trust.check_origin(self.key[0], self.message.sender,
                                   self.incoming is not None, self.local_name)
            tomb = None
            if self.receiver.match_on:
                named_key = self.natural(attributes)
                tomb = None if self.key is None else \
                    self.work.match_tombstone(self.receiver, named_key)
                if tomb is not None and self.incoming is not None and \
                        not tomb.deletes_seen(self.incoming.clock):
                    # The same record (by its key), deleted here while the
                    # sender did not know: it meets the delete first, even if
                    # a record created here after the delete has the key now.
                    alias = self.work.map(self.name, *self.key, None, Version(
                        clock=tomb.clock, deleted=tomb.deleted, deletes=tomb.deletes),
                        self.life)
                    return self.against_tombstone(alias, attributes)
                record = self.work.match(self.receiver, named_key)
                if record is not None:
                    self.matched(record, attributes)
            if (record is None and identity is None and previous_identity is None
                    and self.key is not None):
                self.not_forgotten()
            if record is None:
                # New here: it may carry only what an earlier life of the
                # identity, or a deleted record of its natural key, had seen.
                if previous_identity is None and identity is not None:
                    previous, previous_identity = identity.version, identity
                if tomb is not None:
                    previous = tomb if previous is None else previous.with_delete(tomb)
                self.believe(previous, identity=previous_identity)
        created = record is None
        if created:
            record = self.kind(attributes)()
        local = self.work.version_of(record) if not created else Version()
        version = self.merge(record, local, attributes, created)
        if created:
            self.work.created(self.receiver, record)
            if not self.receiver.match_on:
                # A unique key broken here is this message's failure, with
                # a hint; flushed now only when the batch is retried alone.
                self.note_unique_keys(record)
        self.track(record, identity, version)
        return record

    def not_forgotten(self) -> None:
        """A record of an identity unknown here is about to be created.  If
        its version is older than a delete whose tombstone was purged here
        (:mod:`.tombstones`), it may be a late update of that deleted
        record, which the tombstone would have kept deleted: refused, not
        created again.  A record new to us carries stamps of when it was
        first published, after every tombstone purged (those are older than
        ``communicator.retention_days``); one that waited longer than that
        in the peer's queue is refused too (docs/operations.rst)."""
        incoming = self.incoming
        if incoming is None:
            return  # the gem's messages know no deletes
        horizon = self.work.purged_before()
        if not horizon:
            return
        hlcs = [hlc for hlc, _ in incoming.stamps.values()] or list(incoming.clock.values())
        if hlcs and min(hlcs) <= horizon:
            raise Refused(f'{self.message.sender} sent {self.name} {self.key[1]} of '
                          f'{self.key[0] or self.local_name}, unknown here, with a version '
                          'older than deletes forgotten here (communicator.retention_days): '
                          'taken for a late update of a deleted record, not created again')

    def kind(self, attributes: dict[str, Any]) -> type:
        """The class a new record is: for a polymorphic hierarchy, the one
        of the polymorphic identity the message names, which must be the
        registered class or a subclass of it here."""
        key = self.receiver.polymorphic_key
        if key is None:
            return self.receiver.cls
        wire_value = attributes.get(key)
        identity = None
        if isinstance(wire_value, (str, int)) and not isinstance(wire_value, bool):
            identity = from_wire(self.receiver.all_columns()[key], wire_value,
                                 self.work.dialect)
        found = None if identity is None else self.receiver.subclass(identity)
        if found is None:
            shown = repr(wire_value)[:60]
            raise Refused(f'{self.message.sender} sent a {self.name} of polymorphic identity '
                          f'{shown} ({key}), which is no {self.receiver.cls.__name__} '
                          f'or subclass of it on {self.local_name}')
        return found

    def same_kind(self, record: object, attributes: dict[str, Any]) -> None:
        """A record keeps its class: a message naming another polymorphic
        identity for it is refused (no ORM can turn one into the other)."""
        key = self.receiver.polymorphic_key
        if key is None or key not in attributes:
            return
        if self.kind(attributes) is not type(record):
            raise Refused(f'{self.message.sender} sent {self.name} {self.message.original_id} '
                          f'as a {self.kind(attributes).__name__}, which is a '
                          f'{type(record).__name__} on {self.local_name}')

    def matched(self, record: object, attributes: dict[str, Any]) -> None:
        """A create that meets a local record by its ``match_on`` key changes
        that record: an update, allowed only of a record the peer knows
        (one with an identity: sent to it, or received from it)."""
        self.require('update')
        self.same_kind(record, attributes)
        self.shared(record)
        self.believe(self.work.version_of(record), record)

    def note_unique_keys(self, record: object) -> None:
        if not self.work.alone:
            return
        try:
            self.work.session.flush()
        except IntegrityError as exc:
            exc.add_note(f'a {self.name} created on {self.message.sender} may have the '
                         'unique key of a local one: receives_from(..., match_on=[...]) '
                         'takes them as the same record')
            raise

    def reuse(self, identity: Identity) -> None:
        """The sender handed the id of a deleted record to a new one: what
        we hold under the identity (a tombstone, or a record whose delete
        never came) is another record.  The identity is mapped anew."""
        if identity.record is not None:
            self.work.detach(identity)

    def track(self, record: object, identity: Identity | None, version: Version) -> None:
        stored = version if self.incoming is not None else None
        if self.key is not None and (identity is None or identity.record is not record):
            self.work.map(self.name, *self.key, record, stored, self.life)
        if stored is not None:
            self.work.save(record, stored)

    def value(self, record: object, key: str, wire_value: Any, created: bool) -> Any:
        """The local Python value for an attribute; a foreign key to a
        synced model points at our copy of the record the sender meant
        (for a new record in a cycle of the batch, set when the batch is
        written: :mod:`.dependencies`)."""
        refs = self.message.refs or {}
        cls = type(record)
        target = self.receiver.references(cls).get(key)
        if target is not None and wire_value is not None:
            if created and (id(self.message), key) in self.work.deferrable:
                origin, original_id = refs[key]
                own = origin == self.local_name
                found = self.work.find(target.name, HERE if own else origin, original_id)
                if found is None or found.record is None and found.local_id is None:
                    self.work.defer_reference(record, key, target.name,
                                              HERE if own else origin, original_id)
                    return None
            return self.resolve(target, *refs[key])  # merge() saw to it that refs has it
        return from_wire(self.receiver.columns(cls)[key], wire_value, self.work.dialect)

    def resolve(self, target: Receiver, origin: str, original_id: int) -> int:
        own = origin == self.local_name
        identity = self.work.find(target.name, HERE if own else origin, original_id)
        if identity is not None and identity.record is not None:
            return self.work.local_id(identity.record)
        if identity is not None and identity.local_id is not None:
            return identity.local_id
        if own and identity is None:
            raise Refused(f'{self.message.sender} refers to {target.name} {original_id} of '
                          f'{self.local_name}, which was never sent to it')
        raise LookupError(f'refers to {target.name} {original_id} of {origin}, '
                          'which is not here (yet)')

    def merge(self, record: object, local: Version, attributes: dict[str, Any],
              created: bool) -> Version:
        """Write the attributes the message wins into ``record``; the merged
        version."""
        incoming = self.incoming
        version = Version(clock=merge_clocks(local.clock, incoming.clock if incoming else {}),
                          stamps=dict(local.stamps))
        columns = self.receiver.columns(type(record))
        values = dict(attributes)
        refs = self.message.refs or {}
        references = self.receiver.references(type(record))
        for key, (_, ref_id) in refs.items():
            if key in columns and key not in references:
                raise Refused(f'{self.message.sender} sent a reference for {key!r}, '
                              f'which is no foreign key of {self.name} to a synced model')
            values.setdefault(key, ref_id)  # whom the key means, also if the body lacks it
        for key in references:
            if values.get(key) is not None and key not in refs:
                # A raw value would be one of our ids, chosen by the peer.
                raise Refused(f'{self.message.sender} sent {self.name}.{key} without '
                              'saying whom it refers to (refs)')
        # A foreign key to a keyed model is its key: it must name a record
        # the peer knows (:mod:`.keyrefs`).
        keyrefs.check(self.work, self.receiver, values, self.message.sender)
        for key, wire_value in values.items():
            if key not in columns:
                continue
            remote = self.value(record, key, wire_value, created)
            if incoming is None or created:
                setattr(record, key, remote)
                if incoming is not None and key in incoming.stamps:
                    version.stamps[key] = (*incoming.stamps[key], fingerprint(remote))
                continue
            s_in, s_loc = incoming.stamps.get(key), local.stamp(key)
            if s_in == s_loc or s_in is None or s_in[1] == HERE:
                continue  # no news, or an edit of ours: we know our own edits
            seen_here, seen_there = covered(s_in, local.clock), covered(s_loc, incoming.clock)
            if seen_here and not seen_there:
                continue  # ours is newer: the message is stale for this attribute
            current = self.receiver.canonical(key, getattr(record, key))
            if not seen_here and not seen_there and fingerprint(current) != fingerprint(remote):
                kept, stamp = self.settle(record, key, current, remote, s_loc, s_in)
                setattr(record, key, kept)
                version.stamps[key] = (*stamp, fingerprint(kept))
                continue
            # Newer than ours, or the same value written on both sides: the
            # greater stamp stays, so that both sides keep the same one.
            if (seen_there and not seen_here) or (
                    _order(named(s_in, self.local_name)) > _order(named(s_loc, self.local_name))):
                setattr(record, key, remote)
                version.stamps[key] = (*s_in, fingerprint(remote))
        return version

    def settle(self, record: object, key: str, current: Any, remote: Any,
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
        self.record(record, key, current, remote, s_loc, s_in, winner, kept)
        return kept, stamp

    def record(self, record: object | None, attribute: str | None, local: Any, remote: Any,
               s_loc: Stamp | None, s_in: Stamp | None, winner: str, kept: Any) -> None:
        local_id = None
        if record is not None and inspect(record).identity is not None:
            local_id = keys.handle(self.receiver, record)
        self.work.conflict(conflicts.row(
            name=self.name, origin=self.message.origin or self.local_name,
            original_id=self.message.original_id, local_id=local_id, attribute=attribute,
            local=to_wire(local), remote=to_wire(remote),
            local_stamp=named(s_loc, self.local_name),
            remote_stamp=named(s_in, self.local_name), winner=winner, kept=to_wire(kept),
            peer=self.message.sender, policy=self.receiver.policy))

    # -- tombstones and deletes ---------------------------------------------

    def against_tombstone(self, identity: Identity, attributes: dict[str, Any]) -> object | None:
        """An update for a record deleted here."""
        incoming = self.incoming
        tomb = identity.version or Version()
        if incoming is None:
            return None  # the gem knows no deletes: the record stays deleted
        self.believe(tomb, identity=identity)
        if not tomb.deletes_seen(incoming.clock):
            newer = [s for s in incoming.stamps.values() if not covered(s, tomb.clock)]
            if not newer:
                return None  # stale: made before the delete, and already seen
            deleter = named(tomb.deleted, self.local_name)
            apps = {named(s, self.local_name)[1] for s in newer}
            survives = self.receiver.policy.update_beats_delete(apps, deleter[1])
            self.record(None, None, 'deleted', dict(attributes), deleter, max(newer),
                        'remote' if survives else 'local',
                        attributes if survives else 'deleted')
            if not survives:
                self.work.set_version(identity, Version(
                    clock=merge_clocks(tomb.clock, incoming.clock), deleted=tomb.deleted,
                    deletes=tomb.deletes))
                return None
        # Made after the delete was seen (a new life), or the policy says
        # the update survives: the record is created again, or merged into
        # the live one that has its natural key.
        self.require('create')
        record = self.work.match(self.receiver, self.natural(attributes)) \
            if self.receiver.match_on else None
        if record is not None:
            self.matched(record, attributes)
            version = self.merge(record, self.work.version_of(record), attributes, created=False)
            self.work.map(self.name, *self.key, record, version, self.life)
            self.work.save(record, version)
            return record
        record = self.kind(attributes)()
        version = self.merge(record, Version(clock=tomb.clock), attributes, created=True)
        self.work.created(self.receiver, record)
        self.work.map(self.name, *self.key, record, version, self.life)
        return record

    def delete(self, attributes: dict[str, Any]) -> None:
        self.require('delete')
        if self.key is None:
            raise ValueError('a delete needs the identity of the record (origin, original_id)')
        incoming = self.incoming
        identity = self.find()
        target = None
        if identity is not None and incoming.life > identity.life:
            trust.check_life(incoming.life, identity.life, self.key[0], self.message.sender,
                             self.local_name)
        if identity is None:
            trust.check_origin(self.key[0], self.message.sender, True, self.local_name)
        if identity is not None and incoming.life < identity.life:
            pass  # about a record that had this id before: it is gone
        elif identity is None or identity.tombstone:
            # Never here, or deleted already: keep (or extend) the tombstone
            # so that a late create or update does not bring it back.
            self.believe(identity.version if identity is not None else None,
                         identity=identity)
            tomb = (identity.version if identity is not None else None) or Version()
            self.work.map(self.name, *self.key, None, tomb.with_delete(
                Version(clock=dict(incoming.clock), deleted=incoming.deleted)),
                max(identity.life if identity is not None else 0, incoming.life))
        else:
            target = identity.record
            self.believe(self.work.version_of(target), target)
            self.delete_record(target, identity, identity.version)
        if self.receiver.match_on and not (self.receiver.keyed and any(
                attributes.get(key) is None for key in self.receiver.match_on)):
            # (A keyed delete that names no key, as --repair sends one
            # again, is of its identity alone.)
            # The same natural key may live here under another identity (a
            # record created again meanwhile): the delete meets it as well,
            # if the peer knows it; and it is kept by that key, which a
            # record created here later must come after.
            named_key = self.natural(attributes)
            other = self.work.match(self.receiver, named_key)
            if other is not None and other is not target:
                self.shared(other)
                self.believe(self.work.version_of(other), other)
                self.delete_record(other, None, None)
            columns = self.receiver.columns()
            natural = natural_key(self.receiver, {
                key: from_wire(columns[key], named_key.get(key))
                for key in self.receiver.match_on})
            if natural is not None:
                self.work.bury_key(self.name, natural, Version(
                    clock=dict(incoming.clock), deleted=incoming.deleted))

    def delete_record(self, record: object | None, identity: Identity | None,
                      fallback: Version | None) -> None:
        """Delete a record (None: one already gone without a tombstone),
        unless an update concurrent with the delete survives by policy."""
        incoming = self.incoming
        local = self.work.version_of(record) if record is not None else (
            fallback or Version())
        concurrent = [(s[0], s[1]) for s in local.stamps.values()
                      if not covered((s[0], s[1]), incoming.clock)]
        deleter = named(incoming.deleted, self.local_name)
        if concurrent:
            apps = {named(s, self.local_name)[1] for s in concurrent}
            survives = self.receiver.policy.update_beats_delete(apps, deleter[1])
            state = None if record is None else _wire_state(self.receiver, record)
            self.record(record, None, state, 'deleted', max(concurrent), deleter,
                        'local' if survives else 'remote', state if survives else 'deleted')
            if survives:
                local.clock = merge_clocks(local.clock, incoming.clock)
                if record is not None:
                    self.work.save(record, local)
                return
        natural = None
        if record is not None:
            natural = natural_key(self.receiver, {key: getattr(record, key)
                                                  for key in self.receiver.match_on})
            self.work.delete(self.receiver, record)
        self.work.bury(record, identity, Version(
            clock=merge_clocks(local.clock, incoming.clock), deleted=incoming.deleted), natural)


def _wire_state(receiver: Receiver, record: object) -> dict[str, Any]:
    return {key: to_wire(getattr(record, key)) for key in receiver.columns(type(record))}
