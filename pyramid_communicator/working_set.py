"""The records a batch of inbound messages touches, read in a few queries
and written back in a few.

Applying message by message would cost half a dozen statements each
(identity, record, version, mapping insert, version update); a batch
instead loads every identity, record, alias and ``match_on`` candidate it
needs up front (a query per record name), applies its messages to ORM
objects in memory, and at the end flushes the ORM once and writes the
mappings, versions and conflicts with one multi-row statement each.
Created records go through the ORM, so the host's model events and
validators run as usual.
"""
from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, func, inspect, select, update
from sqlalchemy.orm import Session

from . import bulk, keyrefs, keys, tombstones, tracking
from .models import communicator_conflicts, communicator_mappings, outbound_messages
from .predicates import one_of
from .records import (
    NAME_PREFIX,
    Receiver,
    body_name,
    fingerprint,
    from_wire,
    natural_key,
    receiver_for,
    receiver_of,
)
from .versions import HERE, Version

M = communicator_mappings.c
OUT = outbound_messages.c


@dataclasses.dataclass(eq=False)
class Identity:
    """One row of ``communicator_mappings``, as the batch sees it."""
    name: str
    origin: str
    original_id: int
    row_id: int | None = None   # None until written
    local_id: int | None = None
    record: object | None = None  # the live local record, when there is one
    version: Version | None = None
    life: int = 0
    dirty: bool = False
    local_key: str | None = None  # a keyed record's key (:mod:`.keys`)

    @property
    def tombstone(self) -> bool:
        return self.local_id is None and self.record is None


def _key(origin: str | None, original_id: int, local_name: str) -> tuple[str, int]:
    return (HERE if origin in (None, local_name) else origin, original_id)


class WorkingSet:
    def __init__(self, session: Session, local_name: str, alone: bool = False,
                 gem_peer: bool = False) -> None:
        self.session = session
        self.local_name = local_name
        #: Messages without versions are accepted (``communicator.gem_peer``).
        self.gem_peer = gem_peer
        #: (name, origin, original_id) -> the smallest hlc of our edits of
        #: that identity still in the outbound queue; read when first asked.
        self._undelivered: dict[tuple[str, str, int], int] | None = None
        self._undelivered_keys: set[tuple[str, str, int]] = set()
        self.dialect = session.get_bind().dialect.name
        #: A batch of one message (a failed batch split down): errors are
        #: worth explaining, flushes cost nothing extra.
        self.alone = alone
        self.identities: dict[tuple[str, str, int], Identity] = {}
        self.looked_up: set[tuple[str, str, int]] = set()  # also those not found
        self.aliases: dict[int, list[Identity]] = defaultdict(list)  # id(record) ->
        self.records: dict[tuple[str, int], object] = {}
        #: (name, local id) -> ``local_key`` of keyed records (:mod:`.keys`)
        self.key_texts: dict[tuple[str, int], str] = {}
        self.natural: dict[tuple, object] = {}
        #: (name, first ``match_on`` value) whose records were all loaded
        self.natural_searched: set[tuple[str, Any]] = set()
        #: (name, natural key digest) -> the version of a delete of that key
        self.natural_tombstones: dict[tuple[str, str], Version] = {}
        self.buried_keys: set[tuple[str, str]] = set()
        #: (name, natural key digest) looked up already, found or not
        self.tombstones_searched: set[tuple[str, str]] = set()
        #: Names that may have natural-key tombstones (stored, or made in
        #: this batch): for the others, keys are never computed.
        self.buried_names: set[str] = set()
        self.conflicts: list[dict[str, Any]] = []
        #: (id(message), attribute): foreign keys that may wait for a record
        #: created later in the batch (a cycle, :mod:`.dependencies`).
        self.deferrable: set[tuple[int, str]] = set()
        self._later: list[tuple[object, str, str, str, int]] = []
        self._digests: dict[tuple, str | None] = {}
        self._purged_before: int | None = None

    # -- reading -------------------------------------------------------------

    def preload(self, messages: Iterable[Any]) -> None:
        """Read what ``messages`` will need, a few queries per record name."""
        wanted: dict[str, set[tuple[str, int]]] = defaultdict(set)
        creates: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for message in messages:
            try:
                name, attributes = message.decode()
                receiver_for(name)
            except (ValueError, LookupError):
                continue  # fails on its own when applied
            if message.original_id is not None:
                wanted[name].add(_key(message.origin, message.original_id, self.local_name))
            creates[name].append(attributes)
            for target, named in keyrefs.targets(receiver_for(name), attributes):
                # The keyed records its foreign keys name, and their
                # identities: checked by applying (:mod:`.keyrefs`).
                creates[target.name].append(named)
            for ref_origin, ref_id in (message.refs or {}).values():
                for target in receiver_for(name).all_references().values():
                    wanted[target.name].add(_key(ref_origin, ref_id, self.local_name))
        for name, identities in wanted.items():
            self._load_identities(name, identities)
        for name, attribute_list in creates.items():
            self._load_natural(receiver_for(name), attribute_list)
        by_name: dict[str, set[int]] = defaultdict(set)
        for identity in self.identities.values():
            if identity.local_id is not None:
                by_name[identity.name].add(identity.local_id)
        for name, ids in by_name.items():
            self._load_records(receiver_for(name), ids)
        self._load_aliases()

    def _rows(self, statement) -> list:
        return self.session.execute(statement).all()

    def _remember(self, name: str, row: Any) -> Identity:
        """Keep a row read; a row read again (after its record was locked)
        replaces what the first read saw."""
        key = (name, row.origin, row.original_id)
        version = Version.loads(row.version) if row.version else None
        identity = self.identities.get(key)
        if identity is None:
            identity = Identity(name, row.origin, row.original_id, row.id, row.local_id,
                                version=version, life=row.life or 0)
            self.identities[key] = identity
        else:
            identity.local_id, identity.version = row.local_id, version
            identity.life = row.life or 0
        identity.local_key = row.local_key
        if row.local_key is not None and row.local_id is not None:
            self.key_texts[(name, row.local_id)] = row.local_key
        return identity

    def _load_identities(self, name: str, keys: set[tuple[str, int]]) -> None:
        keys = {key for key in keys if (name, *key) not in self.looked_up}
        self.looked_up.update((name, *key) for key in keys)
        for chunk in _chunks(sorted(keys), 500):
            origins = {origin for origin, _ in chunk}
            ids = {original_id for _, original_id in chunk}
            for row in self._rows(select(M.id, M.origin, M.original_id, M.local_id, M.version,
                                         M.life, M.local_key)
                                  .where(M.name == name, M.origin.in_(origins),
                                         one_of(M.original_id, ids, self.dialect))):
                if (row.origin, row.original_id) in keys:
                    self._remember(name, row)

    def _load_records(self, receiver: Receiver, ids: set[int]) -> None:
        mapper = inspect(receiver.cls)
        pk = mapper.primary_key[0]
        ids = {i for i in ids if (receiver.name, i) not in self.records}
        for chunk in _chunks(sorted(ids), 500):
            if receiver.keyed:
                texts = [self.key_texts[(receiver.name, i)] for i in chunk
                         if (receiver.name, i) in self.key_texts]
                if not texts:
                    continue
                condition = keys.where(receiver, texts)
            else:
                condition = one_of(pk, chunk, self.dialect)
            statement = select(receiver.cls).where(condition).with_for_update()
            for record in self.session.scalars(statement):
                self.records[(receiver.name, keys.handle(receiver, record))] = record

    def _load_natural(self, receiver: Receiver, attribute_list: list[dict[str, Any]]) -> None:
        """Local records whose ``match_on`` key a create may carry."""
        if not receiver.match_on:
            return
        columns = receiver.columns()
        connection = self.session.connection()
        if tracking.has_natural_tombstones(connection, receiver.name):
            self.buried_names.add(receiver.name)
            digests = {self._natural_digest(receiver, attrs) for attrs in attribute_list}
            digests.discard(None)
            for key, version in tracking.natural_tombstones(connection, receiver.name,
                                                            digests).items():
                self.natural_tombstones[(receiver.name, key)] = version
            if not set(receiver.match_on) & set(receiver.references()):
                # Keys with a foreign key part are compared once translated
                # (applying does that): those are looked up when asked.
                self.tombstones_searched.update((receiver.name, key) for key in digests)
        first = receiver.match_on[0]
        values = {from_wire(columns[first], attrs.get(first)) for attrs in attribute_list}
        values.discard(None)
        if first not in receiver.references():
            # Every record with these first parts is loaded now: a key
            # not found among them is not here (no lookup of its own).
            self.natural_searched.update((receiver.name, value) for value in values)
        for chunk in _chunks(sorted(values, key=repr), 500):
            statement = (select(receiver.cls)
                         .where(one_of(getattr(receiver.cls, first), chunk, self.dialect))
                         .with_for_update())
            for record in self.session.scalars(statement):
                self.natural[self._natural_key(receiver, record)] = record
                self.records.setdefault((receiver.name, keys.handle(receiver, record)), record)

    def _load_aliases(self) -> None:
        """Every identity of the records loaded: they share one version."""
        by_name: dict[str, set[int]] = defaultdict(set)
        for name, local_id in self.records:
            by_name[name].add(local_id)
        for name, ids in by_name.items():
            for chunk in _chunks(sorted(ids), 500):
                # Read (again) and locked after the records, as publishing
                # locks them: a version committed meanwhile is seen.
                for row in self._rows(select(M.id, M.origin, M.original_id, M.local_id,
                                             M.version, M.life, M.local_key)
                                      .where(M.name == name,
                                             one_of(M.local_id, chunk, self.dialect))
                                      .with_for_update()):
                    self._remember(name, row)
        for identity in self.identities.values():
            if identity.local_id is not None:
                identity.record = self.records.get((identity.name, identity.local_id))
                if identity.record is not None:
                    self.aliases[id(identity.record)].append(identity)

    @staticmethod
    def _natural_key(receiver: Receiver, record: object) -> tuple:
        return (receiver.name, *(getattr(record, key) for key in receiver.match_on))

    # -- what applying asks --------------------------------------------------

    def find(self, name: str, origin: str, original_id: int) -> Identity | None:
        identity = self.identities.get((name, origin, original_id))
        if identity is None and (name, origin, original_id) not in self.looked_up:
            # Not preloaded (a malformed batch neighbour, say): ask the database.
            self._load_identities(name, {(origin, original_id)})
            identity = self.identities.get((name, origin, original_id))
            if identity is not None and identity.local_id is not None:
                self._load_records(receiver_for(name), {identity.local_id})
                identity.record = self.records.get((name, identity.local_id))
                if identity.record is not None:
                    self.aliases[id(identity.record)].append(identity)
        return identity

    def purged_before(self) -> int:
        """The latest delete whose tombstone was purged here (0: none), read
        once per batch when first asked (:func:`.tombstones.purged_before`)."""
        if self._purged_before is None:
            self._purged_before = tombstones.purged_before(self.session)
        return self._purged_before

    def undelivered(self, record: object | None, identity: Identity | None = None) -> int | None:
        """The smallest hlc of this app's edits of ``record`` (or of the
        identity) that wait in the outbound queue: the peer cannot have
        seen them.  One query per batch, for every identity it holds."""
        keys = [(i.name, i.origin, i.original_id)
                for i in (self.aliases.get(id(record), ()) if record is not None else ())]
        if identity is not None:
            keys.append((identity.name, identity.origin, identity.original_id))
        if self._undelivered is None or any(key not in self._undelivered_keys for key in keys):
            # Every identity of the batch at once (one read for most batches).
            wanted = set(self.identities) | set(keys)
            self._undelivered = self._load_undelivered(wanted)
            self._undelivered_keys = wanted
        found = [self._undelivered[key] for key in keys if key in self._undelivered]
        return min(found, default=None)

    def _load_undelivered(self, keys: set[tuple[str, str, int]],
                          ) -> dict[tuple[str, str, int], int]:
        by_id = defaultdict(set)
        for name, origin, original_id in keys:
            by_id[original_id].add((name, origin))
        found: dict[tuple[str, str, int], int] = {}
        if not by_id:
            return found
        for chunk in _chunks(sorted(by_id), 500):
            rows = self._rows(select(func.substr(OUT.body, 1, NAME_PREFIX).label('head'),
                                     OUT.origin, OUT.original_id, OUT.version)
                              # given up: never goes, the peer may pass it
                              .where(OUT.delivered_at.is_(None), OUT.given_up_at.is_(None),
                                     one_of(OUT.original_id, chunk, self.dialect)))
            for row in rows:
                origin = HERE if row.origin in (None, self.local_name) else row.origin
                name = body_name(row.head)
                if (name, origin) not in by_id[row.original_id] or not row.version:
                    continue
                hlc = json.loads(row.version).get('clock', {}).get(HERE)
                if hlc:
                    key = (name, origin, row.original_id)
                    found[key] = min(found.get(key, hlc), hlc)
        return found

    def version_of(self, record: object) -> Version:
        for identity in self.aliases.get(id(record), ()):
            if identity.version is not None:
                return identity.version
        return Version()

    def match(self, receiver: Receiver, attributes: dict[str, Any]) -> object | None:
        columns = receiver.columns()
        key = [receiver.name]
        for attribute in receiver.match_on:
            value = from_wire(columns[attribute], attributes.get(attribute))
            if value is None:
                return None
            key.append(value)
        record = self.natural.get(tuple(key))
        if (record is None and receiver.keyed and tuple(key) not in self.natural
                and (receiver.name, key[1]) not in self.natural_searched):
            # Not preloaded (a key part that is a foreign key, translated by
            # the caller): looked up by its primary key, once.
            values = tuple(key[1:])
            found = self.session.scalars(
                select(receiver.cls).where(keys.where(receiver, [keys.text(values)]))
                .with_for_update()).first()
            if found is not None and (found in self.session.deleted
                                      or inspect(found).was_deleted):
                found = None  # deleted in this batch, not flushed yet
            self.natural[tuple(key)] = found
            if found is not None:
                handle = keys.handle(receiver, found)
                self.records.setdefault((receiver.name, handle), found)
                for row in self._rows(select(M.id, M.origin, M.original_id, M.local_id,
                                             M.version, M.life, M.local_key)
                                      .where(M.name == receiver.name, M.local_id == handle)
                                      .with_for_update()):
                    identity = self.identities.get((receiver.name, row.origin, row.original_id))
                    if identity is not None and (identity.dirty or identity.record is not None):
                        continue  # what this batch did to it stands
                    identity = self._remember(receiver.name, row)
                    identity.record = found
                    if identity not in self.aliases[id(found)]:
                        self.aliases[id(found)].append(identity)
            return found
        if record is not None and self._natural_key(receiver, record) != tuple(key):
            return None  # renamed earlier in this batch
        return record

    def match_tombstone(self, receiver: Receiver, attributes: dict[str, Any]) -> Version | None:
        """The delete of a record here that had the same natural key."""
        if receiver.name not in self.buried_names:
            return None
        key = (receiver.name, self._natural_digest(receiver, attributes))
        if key[1] is not None and key not in self.natural_tombstones \
                and key not in self.tombstones_searched:
            self.tombstones_searched.add(key)
            for found, version in tracking.natural_tombstones(
                    self.session.connection(), receiver.name, [key[1]]).items():
                self.natural_tombstones[(receiver.name, found)] = version
        return self.natural_tombstones.get(key)

    def _natural_digest(self, receiver: Receiver, attributes: dict[str, Any]) -> str | None:
        """``natural_key`` of a message's attributes, computed once per batch."""
        # (type, value): 1, 1.0 and True are equal keys but different values
        wire = tuple((type(v), v) for v in (attributes.get(key) for key in receiver.match_on))
        try:
            return self._digests[(receiver.name, wire)]
        except KeyError:
            pass
        except TypeError:  # a list or object value: not kept
            wire = None
        columns = receiver.columns()
        digest = natural_key(receiver, {key: from_wire(columns[key], attributes.get(key))
                                        for key in receiver.match_on})
        if wire is not None:
            self._digests[(receiver.name, wire)] = digest
        return digest

    def created(self, receiver: Receiver, record: object) -> None:
        self.session.add(record)
        if receiver.match_on:
            self.natural[self._natural_key(receiver, record)] = record

    def delete(self, receiver: Receiver, record: object) -> None:
        """Delete a record; a later create in the batch must not match it."""
        self.session.delete(record)
        if receiver.match_on:
            self.natural.pop(self._natural_key(receiver, record), None)

    def local_id(self, record: object) -> int:
        """The record's local id (:func:`.keys.handle`); a record created in
        this batch is flushed for it (a later message refers to it)."""
        state = inspect(record)
        if state.identity is None:
            self.session.flush()
        return keys.handle(receiver_of(record), record)

    # -- writing -------------------------------------------------------------

    def defer_reference(self, record: object, attribute: str, name: str, origin: str,
                        original_id: int) -> None:
        """Set ``record.attribute`` to the local id of the identity when the
        batch is written: a record created later in the batch."""
        self._later.append((record, attribute, name, origin, original_id))

    def _set_deferred(self) -> None:
        """The foreign keys of cycles, now that the batch's records exist;
        their versions' fingerprints are those of the local ids set."""
        for record, attribute, name, origin, original_id in self._later:
            state = inspect(record)
            if state.transient or state.detached or record in self.session.deleted:
                continue  # deleted later in the batch
            identity = self.identities.get((name, origin, original_id))
            if identity is None or identity.record is None:
                raise LookupError(f'refers to {name} {original_id} of {origin}, '
                                  'which is not here (yet)')
            value = self.local_id(identity.record)
            setattr(record, attribute, value)
            version = self.version_of(record)
            stamp = version.stamps.get(attribute)
            if stamp is not None:
                version.stamps[attribute] = (*stamp[:2], fingerprint(value))
        self._later.clear()

    def map(self, name: str, origin: str, original_id: int, record: object | None,
            version: Version | None, life: int | None = None) -> Identity:
        """Map an identity to ``record`` (None: keep it as a tombstone), in
        ``life`` if given."""
        key = (name, origin, original_id)
        identity = self.identities.get(key)
        if identity is None:
            identity = self.identities[key] = Identity(name, origin, original_id)
        if identity.record is not None and identity.record is not record:
            self.aliases[id(identity.record)].remove(identity)
        identity.record, identity.version, identity.dirty = record, version, True
        identity.local_id = None
        if life is not None:
            identity.life = life
        if record is not None and identity not in self.aliases[id(record)]:
            self.aliases[id(record)].append(identity)
        return identity

    def detach(self, identity: Identity) -> None:
        """The identity no longer stands for its record (left as it is)."""
        if identity.record is not None:
            self.aliases[id(identity.record)].remove(identity)
        identity.record = identity.local_id = None
        identity.dirty = True

    def save(self, record: object, version: Version) -> None:
        for identity in self.aliases.get(id(record), ()):
            identity.version, identity.dirty = version, True

    def bury(self, record: object | None, identity: Identity | None, version: Version,
             natural: str | None = None) -> None:
        """The record is deleted: its identities become tombstones."""
        targets = list(self.aliases.pop(id(record), ())) if record is not None else []
        if identity is not None and identity not in targets:
            targets.append(identity)
        for each in targets:
            each.record, each.local_id, each.version, each.dirty = None, None, version, True
        if natural is not None and targets:
            self.bury_key(targets[0].name, natural, version)

    def bury_key(self, name: str, natural: str, version: Version) -> None:
        """Keep a delete by its natural key, merged with earlier ones."""
        key = (name, natural)
        self.buried_names.add(name)
        old = self.natural_tombstones.get(key) or Version()
        self.natural_tombstones[key] = old.with_delete(version)
        self.buried_keys.add(key)

    def set_version(self, identity: Identity, version: Version) -> None:
        identity.version, identity.dirty = version, True

    def conflict(self, row: dict[str, Any]) -> None:
        """Keep a conflict (:func:`.conflicts.row`), written with the batch."""
        self.conflicts.append(row)

    def write(self) -> None:
        """Flush the records, then the mappings and conflicts."""
        self._set_deferred()
        self.session.flush()
        inserts, updates = [], []
        for identity in self.identities.values():
            if not identity.dirty:
                continue
            local_id, local_key = identity.local_id, identity.local_key
            if identity.record is not None:
                receiver = receiver_of(identity.record)
                local_id = keys.handle(receiver, identity.record)
                local_key = keys.text_of(receiver, identity.record)
            elif local_id is None:
                local_key = None
            values = {'local_id': local_id, 'local_key': local_key,
                      'version': identity.version.dumps() if identity.version else None,
                      'life': identity.life}
            if identity.row_id is None:
                inserts.append({'name': identity.name, 'origin': identity.origin,
                                'original_id': identity.original_id, **values})
            else:
                updates.append({'_id': identity.row_id, **values})
            identity.dirty = False
        connection = self.session.connection()
        bulk.insert_rows(connection, communicator_mappings, inserts)
        if updates:
            connection.execute(
                update(communicator_mappings).where(M.id == bindparam('_id'))
                .values(local_id=bindparam('_local_id'), local_key=bindparam('_local_key'),
                        version=bindparam('_version'), life=bindparam('_life')),
                [{'_id': u['_id'], '_local_id': u['local_id'], '_local_key': u['local_key'],
                  '_version': u['version'], '_life': u['life']} for u in updates])
        if self.conflicts:
            connection.execute(communicator_conflicts.insert(), self.conflicts)
        by_name: dict[str, dict[str, Version]] = defaultdict(dict)
        for name, key in self.buried_keys:
            by_name[name][key] = self.natural_tombstones[(name, key)]
        for name, deleted in by_name.items():
            tracking.bury_natural(connection, name, deleted)


def _chunks(items: list, size: int) -> Iterable[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
