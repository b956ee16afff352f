"""The sync metadata of records: their identities across apps and their
versions, in ``communicator_mappings``.

Core statements on the caller's connection, inside the caller's
transaction: the host's (publishing) or the applier's.  Rows of a live
record are read ``FOR UPDATE`` (PostgreSQL, MariaDB) after the record's own
row was written or locked, so a publish and an apply of the same record
take their locks in the same order and see each other's versions.
"""
from __future__ import annotations

import dataclasses

from sqlalchemy import select, update
from sqlalchemy.engine import Connection, Row

from .models import communicator_mappings
from .versions import HERE, Version

M = communicator_mappings.c


@dataclasses.dataclass
class Tracked:
    """A local record's identities and its version."""
    name: str
    local_id: int
    identities: list[tuple[str, int]]
    version: Version

    @property
    def identity(self) -> tuple[str | None, int]:
        """The identity to send: this app's own when it has one (``None``
        origin, as ``outbound_messages`` stores it), else the smallest of
        the others'.  The peer knows each of them."""
        own = [oid for origin, oid in self.identities if origin == HERE]
        if own:
            return None, own[0]
        return min(self.identities)


def _lockable(connection: Connection, statement):
    if connection.dialect.name == 'sqlite':  # the write lock is the database's
        return statement
    return statement.with_for_update()


def of_record(connection: Connection, name: str, local_id: int,
              lock: bool = True) -> Tracked | None:
    """The identities and version of a live local record, if it has any."""
    statement = (select(M.origin, M.original_id, M.version)
                 .where(M.name == name, M.local_id == local_id).order_by(M.id))
    rows = connection.execute(_lockable(connection, statement) if lock else statement).all()
    if not rows:
        return None
    return Tracked(name, local_id, [(r.origin, r.original_id) for r in rows],
                   Version.loads(next((r.version for r in rows if r.version), None)))


def find(connection: Connection, name: str, origin: str, original_id: int,
         lock: bool = False) -> Row | None:
    """The row of one identity (``origin`` ``''`` for this app's records)."""
    statement = (select(M.id, M.local_id, M.version)
                 .where(M.name == name, M.origin == origin, M.original_id == original_id))
    if lock:
        statement = _lockable(connection, statement)
    return connection.execute(statement).first()


def add_identity(connection: Connection, name: str, origin: str, original_id: int,
                 local_id: int | None, version: Version | None) -> None:
    """Map an identity to a local record (or, with ``local_id`` None, keep
    it as a tombstone).  An existing row of that identity is taken over."""
    values = dict(local_id=local_id, version=None if version is None else version.dumps())
    updated = connection.execute(
        update(communicator_mappings)
        .where(M.name == name, M.origin == origin, M.original_id == original_id)
        .values(**values))
    if updated.rowcount == 0:
        connection.execute(communicator_mappings.insert().values(
            name=name, origin=origin, original_id=original_id, **values))


def save(connection: Connection, name: str, local_id: int, version: Version) -> None:
    """Store the version of a live record on each of its identities."""
    connection.execute(
        update(communicator_mappings)
        .where(M.name == name, M.local_id == local_id)
        .values(version=version.dumps()))


def bury(connection: Connection, name: str, local_id: int, version: Version) -> None:
    """The record is deleted here: its identities become tombstones, which
    outlive it so that no late or concurrent update brings it back."""
    connection.execute(
        update(communicator_mappings)
        .where(M.name == name, M.local_id == local_id)
        .values(local_id=None, version=version.dumps()))


def set_tombstone(connection: Connection, row_id: int, version: Version) -> None:
    connection.execute(update(communicator_mappings).where(M.id == row_id)
                       .values(version=version.dumps()))
