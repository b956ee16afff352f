"""The add-on's tables, on their own :data:`metadata`.

A host app creates them with the add-on's Alembic revisions (version
location ``pyramid_communicator:migrations``, see
:mod:`pyramid_communicator.migrations`) and includes ``metadata`` in its
``target_metadata``; ``metadata.create_all(engine)`` is the shortcut for
tests and demos.  Every change here needs a new revision there.  They are plain
declarative classes on a registry of our own, so they never mix with the
host's ``Base``.
"""
from __future__ import annotations

import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: Naming convention as in the Pyramid cookiecutter, so Alembic autogenerate
#: produces stable constraint names on every database.
NAMING_CONVENTION = {
    'ix': 'ix_%(column_0_label)s',
    'uq': 'uq_%(table_name)s_%(column_0_name)s',
    'ck': 'ck_%(table_name)s_%(constraint_name)s',
    'fk': 'fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s',
    'pk': 'pk_%(table_name)s',
}

#: The add-on's tables, on a ``MetaData`` of their own, apart from the host's.
metadata = MetaData(naming_convention=NAMING_CONVENTION)

#: Message bodies can be large; MySQL's TEXT stops at 64 KiB.
BodyText = Text().with_variant(mysql.LONGTEXT(), 'mysql', 'mariadb')
#: Ids that may outgrow 32 bits on busy queues; SQLite only autoincrements
#: a plain INTEGER primary key.
QueueId = BigInteger().with_variant(Integer(), 'sqlite')
#: Microsecond timestamps on MySQL/MariaDB too (their default is seconds).
Timestamp = DateTime().with_variant(mysql.DATETIME(fsp=6), 'mysql', 'mariadb')


def utcnow() -> datetime.datetime:
    """Naive UTC: the same on every backend, whatever its time zone."""
    return datetime.datetime.now(datetime.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    metadata = metadata


class OutboundMessage(Base):
    """A message waiting for (or done with) delivery to the peer.

    ``origin`` NULL means the record originated in this app; the wire form
    then carries this app's ``communicator.name``.
    """
    __tablename__ = 'outbound_messages'

    id: Mapped[int] = mapped_column(QueueId, primary_key=True, autoincrement=True)
    body: Mapped[str] = mapped_column(BodyText)
    origin: Mapped[str | None] = mapped_column(String(64))
    original_id: Mapped[int | None] = mapped_column(BigInteger)
    #: JSON ``{column: [origin, original_id]}``: whom the record's foreign
    #: keys point at, so the receiver can point at its own copies.
    refs: Mapped[str | None] = mapped_column(Text)
    #: JSON: the record's version (see :mod:`.versions`); NULL for a
    #: message from a peer without versions (the gem).
    version: Mapped[str | None] = mapped_column(BodyText)
    #: The wire format the message was written in (:data:`.wire.FORMAT_VERSION`
    #: when published; 1 for rows older than the column).
    format: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default='1')
    created_at: Mapped[datetime.datetime] = mapped_column(Timestamp, default=utcnow)
    delivered_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    #: Set aside (:mod:`.outbound_failures`): the peer refused the message
    #: for good (too large, or invalid), when and why, and how often it was
    #: tried.  It is not pushed, and later messages of its record wait
    #: behind it, until an operator retries it (these cleared) or gives up
    #: on it (``given_up_*``: then it never goes, and holds nothing back).
    attempts: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    given_up_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    given_up_by: Mapped[str | None] = mapped_column(String(255))
    given_up_reason: Mapped[str | None] = mapped_column(Text)
    #: An echo (:mod:`.echoes`): the origin's signature of a message of a
    #: restored peer's own, sent back to it.  NULL for every other message
    #: (ours are signed as they are sent).
    signature: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        # "WHERE delivered_at IS NULL ORDER BY id" is the queue's only scan.
        Index('ix_outbound_messages_pending', 'delivered_at', 'id'),
        # The id is the message's identity at the peer (unique per sender):
        # it must never be handed out twice.  Without AUTOINCREMENT, SQLite
        # reuses the highest id once that row is deleted (delivered rows
        # pruned), and the peer would drop the new message as a duplicate.
        {'sqlite_autoincrement': True},
    )

    def __repr__(self) -> str:
        return f'<OutboundMessage {self.id} delivered_at={self.delivered_at}>'


class InboundMessage(Base):
    """A message received from a peer, stored before it is applied.

    ``(sender, remote_id)`` is unique: a message sent twice is stored once.
    A message whose application failed keeps ``processed_at`` NULL, its
    ``attempts`` and ``last_error``; it is retried on later runs until it
    succeeds or an operator gives up on it (``given_up_at``).
    """
    __tablename__ = 'inbound_messages'

    id: Mapped[int] = mapped_column(QueueId, primary_key=True, autoincrement=True)
    sender: Mapped[str] = mapped_column(String(255))
    remote_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str] = mapped_column(BodyText)
    origin: Mapped[str | None] = mapped_column(String(64))
    original_id: Mapped[int | None] = mapped_column(BigInteger)
    refs: Mapped[str | None] = mapped_column(Text)
    version: Mapped[str | None] = mapped_column(BodyText)
    #: The format the sender wrote it in; one newer than this app's
    #: :data:`.wire.FORMAT_VERSION` waits, pending, for an upgrade.
    format: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default='1')
    created_at: Mapped[datetime.datetime] = mapped_column(Timestamp, default=utcnow)
    processed_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    failed_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    given_up_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    given_up_by: Mapped[str | None] = mapped_column(String(255))
    given_up_reason: Mapped[str | None] = mapped_column(Text)
    #: Refused for good (the peer may not do this); never retried unless an
    #: operator names it in ``pcommunicate --retry ID``.
    refused_at: Mapped[datetime.datetime | None] = mapped_column(Timestamp)
    #: The origin's signature of a record message it published (hex
    #: HMAC-SHA256, :mod:`.echoes`), NULL if it sent none: kept to echo the
    #: message back should the sender be restored from a backup.
    signature: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (
        UniqueConstraint('sender', 'remote_id'),
        Index('ix_inbound_messages_pending', 'processed_at', 'id'),
    )

    def __repr__(self) -> str:
        return f'<InboundMessage {self.id} from {self.sender}#{self.remote_id}>'


class Mapping(Base):
    """A synced record's identity and version.

    (name, origin, original_id) is the record's identity on the wire: the
    app it was created in and its id there.  ``origin`` ``''`` is this app
    (the row exists once the record was published: the peer may address
    it).  ``local_id`` is the local record it stands for, NULL once the
    record was deleted (the row is then a tombstone).  A record merged
    with another app's by ``match_on`` has a row for each identity; they
    share one version.
    """
    __tablename__ = 'communicator_mappings'

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str] = mapped_column(String(64))
    original_id: Mapped[int] = mapped_column(BigInteger)
    local_id: Mapped[int | None] = mapped_column(BigInteger)
    #: A keyed record's primary key as canonical text (:mod:`.keys`), whose
    #: handle ``local_id`` is; NULL for surrogate-keyed records and tombstones.
    local_key: Mapped[str | None] = mapped_column(String(255))
    #: JSON of :class:`.versions.Version`; NULL before the first versioned change.
    version: Mapped[str | None] = mapped_column(BodyText)
    #: How many records had this identity before (ids handed out anew).
    life: Mapped[int] = mapped_column(Integer, default=0)
    __table_args__ = (
        UniqueConstraint('name', 'origin', 'original_id'),
        Index('ix_communicator_mappings_local', 'name', 'local_id'),
    )


class NaturalTombstone(Base):
    """The delete of a record of a ``match_on`` model, kept by its natural
    key: the same record created elsewhere meanwhile meets the delete
    instead of coming back, and one created again here comes after it.
    Ids can be handed out anew (SQLite does); natural keys identify."""
    __tablename__ = 'communicator_natural_tombstones'

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    #: :func:`.records.natural_key` of the deleted record.
    natural_key: Mapped[str] = mapped_column(String(32))
    #: JSON of :class:`.versions.Version`: the delete's stamp and clock.
    version: Mapped[str] = mapped_column(BodyText)

    __table_args__ = (UniqueConstraint('name', 'natural_key'),)


class LinkState(Base):
    """The last change of one many-to-many link (:mod:`.links`), between
    two local records: whether it is there and the stamp of the edit that
    said so.  A link message older than this stamp changes nothing, so a
    message sent again, late or twice, never brings back a removed link."""
    __tablename__ = 'communicator_links'

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The relationship as the wire names it: ``<record name>.<attribute>``.
    name: Mapped[str] = mapped_column(String(255))
    owner_id: Mapped[int] = mapped_column(BigInteger)
    target_id: Mapped[int] = mapped_column(BigInteger)
    #: 1: linked, 0: removed.
    linked: Mapped[int] = mapped_column(Integer)
    #: The edit's stamp (hlc, app); app ``''`` is this app.
    hlc: Mapped[int] = mapped_column(BigInteger)
    app: Mapped[str] = mapped_column(String(64))

    __table_args__ = (UniqueConstraint('name', 'owner_id', 'target_id'),)


class ConflictRecord(Base):
    """A conflict between concurrent edits, and how it was settled."""
    __tablename__ = 'communicator_conflicts'

    id: Mapped[int] = mapped_column(QueueId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    origin: Mapped[str | None] = mapped_column(String(64))
    original_id: Mapped[int | None] = mapped_column(BigInteger)
    local_id: Mapped[int | None] = mapped_column(BigInteger)
    #: NULL: a delete against an update.
    attribute: Mapped[str | None] = mapped_column(String(255))
    local_value: Mapped[str | None] = mapped_column(Text)
    remote_value: Mapped[str | None] = mapped_column(Text)
    kept_value: Mapped[str | None] = mapped_column(Text)
    local_stamp: Mapped[str | None] = mapped_column(String(100))
    remote_stamp: Mapped[str | None] = mapped_column(String(100))
    #: 'local', 'remote' or 'merged'
    winner: Mapped[str] = mapped_column(String(16))
    policy: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime.datetime] = mapped_column(Timestamp, default=utcnow)

    __table_args__ = (Index('ix_communicator_conflicts_created', 'created_at'),)


class SyncState(Base):
    """Small key/value facts: the last successful exchanges, and what must
    outlive purged rows."""
    __tablename__ = 'communicator_state'

    #: ``last_*`` times of exchanges, ``purged:<sender>`` watermarks,
    #: ``publish_all:<name>`` progress of seeding.
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[str | None] = mapped_column(String(255))
    updated_at: Mapped[datetime.datetime] = mapped_column(Timestamp, default=utcnow)


outbound_messages = OutboundMessage.__table__
inbound_messages = InboundMessage.__table__
communicator_mappings = Mapping.__table__
communicator_state = SyncState.__table__
communicator_conflicts = ConflictRecord.__table__
communicator_natural_tombstones = NaturalTombstone.__table__
communicator_links = LinkState.__table__
