"""The sync metadata of records as publishing sees it: identities and
versions of local records, in ``communicator_mappings``.

Core statements on the host's connection, inside the host's transaction.
Rows of a changed record are read ``FOR UPDATE`` (PostgreSQL, MariaDB)
after the record's own row was written, so a publish and an apply of the
same record take their locks in the same order (record, then metadata)
and see each other's versions.  A record inserted by the host's transaction
has no rows yet: its identity is written with ``INSERT ... ON CONFLICT
DO NOTHING`` (:func:`create_with_message`), so two writers meet on the
unique identity instead.  Applying reads and writes the same rows
set-wise through :mod:`.working_set`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, exists, literal, null, select, union_all, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection

from .models import communicator_mappings, communicator_natural_tombstones, outbound_messages
from .predicates import one_of
from .versions import HERE, Version

M = communicator_mappings.c
T = communicator_natural_tombstones.c


@dataclasses.dataclass
class Tracked:
    """A local record's identities and its version."""
    name: str
    local_id: int
    identities: list[tuple[str, int]]
    version: Version
    lives: dict[tuple[str, int], int] = dataclasses.field(default_factory=dict)

    @property
    def identity(self) -> tuple[str | None, int]:
        """The identity to send: this app's own when it has one (``None``
        origin, as ``outbound_messages`` stores it), else the smallest of
        the others'.  The peer knows each of them."""
        own = [oid for origin, oid in self.identities if origin == HERE]
        if own:
            return None, own[0]
        return min(self.identities)

    @property
    def life(self) -> int:
        origin, original_id = self.identity
        return self.lives.get((origin or HERE, original_id), 0)


_COLUMNS = (M.id, M.origin, M.original_id, M.version, M.local_id, M.life)
_IDS = bindparam('ids', expanding=True)
_NAME = bindparam('name')


def _statements(one: bool) -> dict[tuple[bool, bool], Any]:
    """The lookups of publishing, built once (building a statement costs
    more than running it on a small table): (with tombstones of reused
    ids, with natural-key tombstones) -> statement.  With ``one``, for a
    single record and key (a request that saves one record): plain
    parameters instead of IN lists, which SQLAlchemy renders anew on every
    execution.

    Each part is its own SELECT in a ``UNION ALL``, so that each is a
    search of one index: an ``OR`` of the two mapping conditions made
    SQLite read every mapping of the model on every publish.  The parts
    find disjoint rows (a tombstone has no ``local_id``)."""
    def among(column, name: str):
        return column == bindparam(name) if one else column.in_(
            bindparam(name + 's', expanding=True))

    def mappings(condition):
        return select(*_COLUMNS, null().label('natural_key')).where(M.name == _NAME,
                                                                    condition)
    records = mappings(among(M.local_id, 'id'))
    reused = mappings((M.origin == HERE) & among(M.original_id, 'id')
                      & M.local_id.is_(None))
    # The natural-key tombstones of the same flush in the same round
    # trip: the rows without a mapping id are those.
    natural = select(null(), null(), null(), T.version, null(), null(), T.natural_key).where(
        T.name == _NAME, among(T.natural_key, 'digest'))
    return {(False, False): records,
            (False, True): union_all(records, natural),
            (True, False): union_all(records, reused),
            (True, True): union_all(records, reused, natural)}


_LOOKUPS = _statements(one=False)
_LOOKUP_ONE = _statements(one=True)
_LOCK = select(*_COLUMNS).where(M.id.in_(_IDS)).order_by(M.id).with_for_update()
_LOCK_ONE = select(*_COLUMNS).where(M.id == bindparam('id')).with_for_update()


def of_records(connection: Connection, name: str, local_ids: Iterable[int],
               lock: bool = True,
               tombstones: dict[int, tuple[Version, int]] | None = None,
               natural: dict[str, Version] | None = None,
               digests: Iterable[str] = ()) -> dict[int, Tracked]:
    """:func:`of_record` for many records, in one query.  With
    ``tombstones`` (a dict to fill), the same query also finds deleted
    records of ours whose ids are in use again (a database that hands out
    ids anew): a new record inherits their clock.  With ``natural`` (a dict
    to fill) and ``digests``, it also reads :func:`natural_tombstones`
    of these natural keys (up to 500 of them)."""
    ids = sorted(set(local_ids))
    if not ids:
        return {}
    digests = sorted(set(digests)) if natural is not None else []
    with_natural = bool(digests) and len(digests) <= 500
    if natural is not None and digests and not with_natural:
        natural.update(natural_tombstones(connection, name, digests))
    one = len(ids) == 1 and len(digests) <= 1
    params: dict[str, Any] = {'name': name}
    if one:
        params['id'] = ids[0]
        if with_natural:
            params['digest'] = digests[0]
    else:
        params['ids'] = ids
        if with_natural:
            params['digests'] = digests
    lookups = _LOOKUP_ONE if one else _LOOKUPS
    found: dict[int, Tracked] = {}
    rows = []
    for row in connection.execute(lookups[(tombstones is not None, with_natural)], params):
        if row.id is None:
            natural[row.natural_key] = Version.loads(row.version)
        else:
            rows.append(row)
    rows.sort(key=lambda row: row.id)
    if lock and rows and connection.dialect.name != 'sqlite':
        # Lock by primary key only (a range read FOR UPDATE would take gap
        # locks on MariaDB in the host's REPEATABLE READ transaction) and
        # read the rows as committed now, not as the snapshot saw them.
        rows = (connection.execute(_LOCK_ONE, {'id': rows[0].id}) if len(rows) == 1 else
                connection.execute(_LOCK, {'ids': [r.id for r in rows]})).all()
    for row in rows:
        if row.local_id is None:
            tombstones[row.original_id] = (Version.loads(row.version), row.life or 0)
            continue
        tracked = found.get(row.local_id)
        if tracked is None:
            tracked = found[row.local_id] = Tracked(name, row.local_id, [], Version())
        tracked.identities.append((row.origin, row.original_id))
        tracked.lives[(row.origin, row.original_id)] = row.life or 0
        if row.version and not tracked.version.clock and not tracked.version.deleted:
            tracked.version = Version.loads(row.version)
    return found


def has_natural_tombstones(connection: Connection, name: str) -> bool:
    """Were records of ``name`` ever deleted by their natural key?  Most
    models never are, and then a batch need not compute keys to look up."""
    return connection.execute(select(T.id).where(T.name == name).limit(1)).first() is not None


def natural_tombstones(connection: Connection, name: str,
                       digests: Iterable[str]) -> dict[str, Version]:
    """Versions of deleted records with these natural keys (a record created
    again under the same key comes after the delete)."""
    digests = sorted(set(digests))
    found: dict[str, Version] = {}
    for start in range(0, len(digests), 500):
        for row in connection.execute(select(T.natural_key, T.version).where(
                T.name == name, one_of(T.natural_key, digests[start:start + 500],
                                       connection.dialect.name))):
            found[row.natural_key] = Version.loads(row.version)
    return found


def bury_natural(connection: Connection, name: str, deleted: dict[str, Version]) -> None:
    """Keep (or merge into) the natural-key tombstones of deleted records."""
    if not deleted:
        return
    known = natural_tombstones(connection, name, deleted)
    for digest, version in deleted.items():
        old = known.get(digest)
        merged = (old or Version()).with_delete(version)
        if old is None:
            connection.execute(communicator_natural_tombstones.insert().values(
                name=name, natural_key=digest, version=merged.dumps()))
            continue
        connection.execute(update(communicator_natural_tombstones)
                           .where(T.name == name, T.natural_key == digest)
                           .values(version=merged.dumps()))


def write_versions(connection: Connection, name: str,
                   created: list[tuple[int, Version]], revived: list[tuple[int, Version, int]],
                   changed: list[tuple[int, Version]], buried: list[tuple[int, Version]],
                   key_texts: dict[int, str | None] | None = None) -> None:
    """Write what publishing changed, a statement per kind: new identities
    of our records, revived tombstones, new versions, tombstones.
    ``key_texts``: local id -> ``local_key`` of keyed records (:mod:`.keys`)."""
    key_texts = key_texts or {}
    if created:
        connection.execute(_INSERT, [
            {'name': name, 'origin': HERE, 'original_id': local_id, 'local_id': local_id,
             'local_key': key_texts.get(local_id), 'version': version.dumps(), 'life': 0}
            for local_id, version in created])
    if revived:
        connection.execute(_REVIVE, [{'_name': name, '_id': i, '_local_id': i,
                                      '_local_key': key_texts.get(i),
                                      '_version': v.dumps(), '_life': life}
                                     for i, v, life in revived])
    if changed:
        connection.execute(_CHANGE, [{'_name': name, '_id': i, '_version': v.dumps()}
                                     for i, v in changed])
    if buried:
        connection.execute(_BURY, [{'_name': name, '_id': i, '_version': v.dumps()}
                                   for i, v in buried])


_INSERT = communicator_mappings.insert()
_REVIVE = (update(communicator_mappings)
           .where(M.name == bindparam('_name'), M.origin == HERE,
                  M.original_id == bindparam('_id'))
           .values(local_id=bindparam('_local_id'), local_key=bindparam('_local_key'),
                   version=bindparam('_version'), life=bindparam('_life')))
_BY_RECORD = update(communicator_mappings).where(M.name == bindparam('_name'),
                                                 M.local_id == bindparam('_id'))
_CHANGE = _BY_RECORD.values(version=bindparam('_version'))
_BURY = _BY_RECORD.values(local_id=None, version=bindparam('_version'))


# -- a new record's identity and message in one statement (PostgreSQL) -----------

def _create_with_message(natural: bool) -> Any:
    """``INSERT`` of a record's own identity, only if the record is new to
    the sync metadata, and of its message ``FROM`` that insert: one data-
    modifying ``WITH``.  New means no mapping stands for the record (a
    stale one of an id handed out again), no row holds its identity (a
    tombstone of ours: ``ON CONFLICT``, which also keeps a concurrent
    insert of the same identity from raising) and, with ``natural``, no
    delete of its natural key is kept."""
    record_id = bindparam('id', type_=M.original_id.type)
    new = ~exists().where(M.name == _NAME, M.local_id == record_id)
    if natural:
        new &= ~exists().where(T.name == _NAME, T.natural_key == bindparam('natural_key'))
    mapping = (postgresql.insert(communicator_mappings)
               .from_select(['name', 'origin', 'original_id', 'local_id', 'version', 'life'],
                            select(_NAME, literal(HERE), record_id, record_id,
                                   bindparam('version', type_=M.version.type), literal(0))
                            .where(new))
               .on_conflict_do_nothing(index_elements=['name', 'origin', 'original_id'])
               .returning(M.id)
               .cte('mapping'))
    out = outbound_messages.c
    message = select(bindparam('body', type_=out.body.type), null(), record_id, null(),
                     bindparam('message_version', type_=out.version.type),
                     bindparam('format', type_=out.format.type),
                     bindparam('created_at', type_=out.created_at.type)).select_from(mapping)
    return (outbound_messages.insert()
            .from_select(['body', 'origin', 'original_id', 'refs', 'version', 'format',
                          'created_at'], message)
            .returning(out.id))


_CREATE_WITH_MESSAGE = {natural: _create_with_message(natural) for natural in (False, True)}


def create_with_message(connection: Connection, name: str, local_id: int, version: Version,
                        natural_key: str | None, message: dict[str, Any]) -> int | None:
    """Write a record's own identity and version and its outbound message
    (``message``: a row of ``outbound_messages`` without identity columns)
    in one round trip, if the record is new to the sync metadata (see
    :func:`_create_with_message`); the message's id, or None when it was
    not, and then nothing was written.  PostgreSQL only.

    A record inserted by this transaction has no mapping row yet, so there
    is nothing to lock: the unique identity is what two writers would
    meet on."""
    params = {'name': name, 'id': local_id, 'version': version.dumps(),
              'body': message['body'], 'message_version': message['version'],
              'format': message['format'], 'created_at': message['created_at']}
    if natural_key is not None:
        params['natural_key'] = natural_key
    return connection.execute(_CREATE_WITH_MESSAGE[natural_key is not None], params).scalar()
