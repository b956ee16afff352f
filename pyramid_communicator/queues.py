"""The outbound and inbound queues as SQL, shared by the server view and
the client engine.

Core statements on purpose: they run inside whatever transaction the
caller has (the request's, or one of the engine's), touch only the rows
they need, and stay the same on SQLite, PostgreSQL and MariaDB.
"""
from __future__ import annotations

import datetime
import json
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Row
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import bulk, wire
from .models import communicator_state, inbound_messages, outbound_messages, utcnow
from .outbound_failures import PENDING as PENDING_OUT
from .predicates import one_of
from .wire import WireMessage

OUT = outbound_messages.c
_plain = json.JSONEncoder().encode
_compact = json.JSONEncoder(separators=(',', ':')).encode
IN = inbound_messages.c


def _dialect(session: Session) -> str:
    return session.get_bind().dialect.name


def _changed(session: Session) -> None:
    """Core DML is invisible to zope.sqlalchemy; tell it to commit."""
    mark_changed(session)


def _insert_ignoring_duplicates(session: Session, table: Table,
                                rows: list[dict[str, Any]], keys: Sequence[str]) -> int:
    """INSERT that skips rows whose unique ``keys`` already exist, also
    when a concurrent transaction inserts the same rows at the same moment
    (the database's unique index settles the race, not a prior SELECT)."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect == 'postgresql':
        statement = postgresql.insert(table).on_conflict_do_nothing(index_elements=keys)
    elif dialect in ('mysql', 'mariadb'):
        # A no-op update, unlike INSERT IGNORE, still fails on other errors.
        statement = mysql.insert(table)
        statement = statement.on_duplicate_key_update({keys[0]: statement.inserted[keys[0]]})
    elif dialect == 'sqlite':
        statement = sqlite.insert(table).on_conflict_do_nothing(index_elements=keys)
    else:  # pragma: no cover - other backends: plain insert, unique index guards
        statement = insert(table)
    # executemany: compiled once, sent as multi-row statements by SQLAlchemy
    # ("insertmanyvalues"), instead of a statement compiled per chunk.
    result = session.execute(statement, rows)
    _changed(session)
    return max(result.rowcount, 0)


# -- outbound ---------------------------------------------------------------

def pending_outbound(session: Session, limit: int, after_id: int = 0) -> list[Row]:
    """Undelivered messages in id order, set-aside and given-up ones left
    out (:mod:`.outbound_failures`).  No cursor survives a run: an id that
    commits late is still undelivered next time, never skipped."""
    return session.execute(
        select(OUT.id, OUT.body, OUT.origin, OUT.original_id, OUT.refs, OUT.version,
               OUT.format, OUT.signature)
        .where(PENDING_OUT, OUT.id > after_id)
        .order_by(OUT.id).limit(limit)
    ).all()


def count_pending_outbound(session: Session) -> int:
    return session.execute(select(func.count()).where(PENDING_OUT)).scalar_one()


def within_bytes(rows: list[Row], limit: int) -> list[Row]:
    """The leading rows whose bodies add up to at most ``limit`` bytes, and
    always the first: a batch is bounded by size as well as by count."""
    total = 0
    for index, row in enumerate(rows):
        total += len(row.body)
        if total > limit and index > 0:
            return rows[:index]
    return rows


def outbound_from(session: Session, from_id: int, limit: int) -> list[Row]:
    """The gem's view of the queue: every message with ``id >= from_id``."""
    return session.execute(
        select(OUT.id, OUT.body, OUT.origin, OUT.original_id, OUT.refs, OUT.version,
               OUT.format, OUT.signature)
        .where(OUT.id >= from_id).order_by(OUT.id).limit(limit)
    ).all()


#: Ids per UPDATE when marking messages delivered: an IN list of a few
#: thousand stays under every database's limit of bound parameters.
MARK_CHUNK = 1000


def mark_delivered(session: Session, ids: Iterable[int]) -> int:
    ids = list(ids)
    if not ids:
        return 0
    now = utcnow()
    marked = 0
    for start in range(0, len(ids), MARK_CHUNK):
        chunk = ids[start:start + MARK_CHUNK]
        result = session.execute(
            update(outbound_messages)
            .where(one_of(OUT.id, chunk, _dialect(session)), OUT.delivered_at.is_(None))
            .values(delivered_at=now))
        marked += result.rowcount
    _changed(session)
    return marked


# -- inbound ----------------------------------------------------------------

def store_inbound(session: Session, sender: str,
                  messages: Iterable[WireMessage]) -> list[WireMessage]:
    """Store what arrived; a message already stored is left alone, and so
    is one at or below the highest id purged for this sender (it was
    stored, applied and purged before: a re-send or a replay).

    A message refused on arrival (malformed, ``error`` set) is stored
    refused: ``refused_at`` set, ``last_error`` ``refused: <reason>``,
    never pending, so never applied; ``--status`` counts it, and its id
    is acknowledged like any other so that the peer moves on.

    Returns the messages this call stored to be applied, refused ones left
    out (none if the database could not tell them apart from rows a
    concurrent store wrote).

    Callers store one sender's batches one at a time: the server's view
    takes the sender's state row first, ``pcommunicate`` its run lock.  So
    the SELECT below sees what the transaction before stored, and on
    psycopg the rows go by COPY (:mod:`.bulk`).  Should two stores of the
    same messages still meet, the unique index refuses the second, which
    is sent again later and then finds them stored."""
    now = utcnow()
    purged = purged_watermark(session, sender)
    messages = list(messages)
    # Skip what is stored already (a re-send): the INSERT below then rarely
    # meets rows of a concurrent request, which on InnoDB can deadlock.
    stored = set(session.execute(
        select(IN.remote_id).where(IN.sender == sender,
                                   one_of(IN.remote_id, [m.id for m in messages],
                                          _dialect(session)))).scalars())
    fresh = [m for m in messages if m.id not in stored and m.id > purged]
    rows = [_inbound_row(sender, m, now) for m in fresh]
    applicable = [m for m in fresh if m.error is None]
    connection = session.connection()
    if bulk.copies(connection):
        bulk.insert_rows(connection, inbound_messages, rows)
        _changed(session)
        return applicable
    inserted = _insert_ignoring_duplicates(session, inbound_messages, rows,
                                           ('sender', 'remote_id'))
    return applicable if inserted == len(fresh) else []


def _inbound_row(sender: str, message: WireMessage,
                 now: datetime.datetime) -> dict[str, Any]:
    """The row of one arrival; every row has the same keys (COPY)."""
    refused = message.error is not None
    return {'sender': sender, 'remote_id': message.id, 'body': message.body,
            'origin': message.origin, 'original_id': message.original_id,
            'refs': _plain(message.refs) if message.refs else None,
            'version': _compact(message.version) if message.version else None,
            'format': message.format, 'created_at': now, 'attempts': 0,
            'signature': None if refused else message.signature,
            'refused_at': now if refused else None,
            'failed_at': now if refused else None,
            'last_error': f'refused: {message.error}'[:4000] if refused else None}


def last_remote_id(session: Session, sender: str) -> int:
    """The gem's cursor: the highest id stored from ``sender``, also when
    those rows were purged since."""
    stored = session.execute(
        select(func.coalesce(func.max(IN.remote_id), 0)).where(IN.sender == sender)
    ).scalar_one()
    return max(stored, purged_watermark(session, sender))


def _watermark_key(sender: str) -> str:
    return f'purged:{sender}'


def purged_watermark(session: Session, sender: str) -> int:
    value = session.execute(select(communicator_state.c.value)
                            .where(communicator_state.c.key == _watermark_key(sender))
                            ).scalar()
    return int(value) if value else 0


def raise_purged_watermark(session: Session, sender: str, remote_id: int) -> None:
    """Remember that ``sender``'s messages up to ``remote_id`` were purged."""
    if remote_id > purged_watermark(session, sender):
        set_state(session, _watermark_key(sender), str(remote_id))


def pending_inbound(session: Session, limit: int, after_id: int = 0,
                    ids: Sequence[int] | None = None) -> list[Row]:
    query = (select(IN.id, IN.sender, IN.remote_id, IN.body, IN.origin, IN.original_id,
                    IN.refs, IN.version, IN.format, IN.failed_at, IN.signature)
             .where(IN.processed_at.is_(None), IN.given_up_at.is_(None),
                    IN.refused_at.is_(None), IN.id > after_id)
             .order_by(IN.id).limit(limit))
    if ids is not None:
        query = query.where(IN.id.in_(ids))
    return session.execute(query).all()


def failed_inbound(session: Session, failed_before: datetime.datetime,
                   ids: Sequence[int] | None = None) -> list[Row]:
    """``(id, attempts, failed_at)`` of pending messages that failed at or
    before ``failed_before``: the candidates for a retry, without their
    bodies, so that many failures are cheap to look at on every run
    (:mod:`.retries` decides which are due)."""
    query = (select(IN.id, IN.attempts, IN.failed_at)
             .where(IN.processed_at.is_(None), IN.given_up_at.is_(None),
                    IN.refused_at.is_(None), IN.failed_at.is_not(None),
                    IN.failed_at <= failed_before, understood()))
    if ids is not None:
        query = query.where(IN.id.in_(ids))
    return session.execute(query).all()


def understood():
    """Messages of a format this version knows; newer ones wait, pending,
    for the upgrade (never claimed, so never applied, failed or dropped)."""
    return IN.format <= wire.FORMAT_VERSION


def count_pending_inbound(session: Session) -> int:
    """How many pending messages a run can apply (a newer format waits)."""
    return session.execute(
        select(func.count()).where(IN.processed_at.is_(None), IN.given_up_at.is_(None),
                                   IN.refused_at.is_(None),
                                   understood())).scalar_one()


def claim_inbound(session: Session, message_id: int) -> bool:
    """Mark one message processed, first thing in its own transaction.

    The UPDATE takes the row lock: a second worker on the same message
    waits, then finds it processed (or, if the first rolled back, takes
    its turn).  Nothing is applied twice.
    """
    result = session.execute(
        update(inbound_messages)
        .where(IN.id == message_id, IN.processed_at.is_(None), IN.given_up_at.is_(None),
               IN.refused_at.is_(None), understood())
        .values(processed_at=utcnow(), attempts=IN.attempts + 1,
                last_error=None, failed_at=None))
    _changed(session)
    return result.rowcount == 1


def claim_batch(session: Session, message_ids: Sequence[int]) -> set[int]:
    """:func:`claim_inbound` for a batch, in one or two statements: the
    ids this transaction claimed (another worker may hold the rest)."""
    if not message_ids:
        return set()
    claimable = (one_of(IN.id, message_ids, _dialect(session)), IN.processed_at.is_(None),
                 IN.given_up_at.is_(None), IN.refused_at.is_(None), understood())
    values = dict(processed_at=utcnow(), attempts=IN.attempts + 1, last_error=None,
                  failed_at=None)
    dialect = session.get_bind().dialect
    if dialect.update_returning:  # PostgreSQL, SQLite: the UPDATE locks and tells
        claimed = session.execute(update(inbound_messages).where(*claimable)
                                  .values(**values).returning(IN.id)).scalars().all()
    else:  # MariaDB/MySQL: lock the rows, then mark them
        claimed = session.execute(select(IN.id).where(*claimable)
                                  .with_for_update()).scalars().all()
        if claimed:
            session.execute(update(inbound_messages)
                            .where(one_of(IN.id, claimed, _dialect(session)))
                            .values(**values))
    _changed(session)
    return set(claimed)


def record_failure(session: Session, message_id: int, error: str) -> None:
    session.execute(
        update(inbound_messages)
        .where(IN.id == message_id, IN.processed_at.is_(None))
        .values(attempts=IN.attempts + 1, last_error=error[:4000],
                failed_at=utcnow()))
    _changed(session)


def record_refusal(session: Session, message_id: int, reason: str) -> None:
    """The peer may not do what this message asks: kept, not retried."""
    now = utcnow()
    session.execute(
        update(inbound_messages)
        .where(IN.id == message_id, IN.processed_at.is_(None))
        .values(attempts=IN.attempts + 1, last_error=reason[:4000], failed_at=now,
                refused_at=now))
    _changed(session)


# -- state ------------------------------------------------------------------

#: The row holding the outcome of the last ``pcommunicate`` run.
LAST_RUN_KEY = 'last_run'


def set_state(session: Session, key: str, value: str | None = None) -> None:
    """Record a fact such as the time of the last successful push."""
    now = utcnow()
    table = communicator_state
    updated = session.execute(
        update(table).where(table.c.key == key).values(value=value, updated_at=now))
    if updated.rowcount == 0:
        _insert_ignoring_duplicates(session, table,
                                    [{'key': key, 'value': value, 'updated_at': now}],
                                    ('key',))
    _changed(session)


def touch_state(session: Session, key: str, value: str | None = None,
                every: float = 5) -> None:
    """:func:`set_state`, but only when the row is missing, says something
    else or is older than ``every`` seconds: a read-only request (a pull)
    stays read-only, without taking a write lock, on most calls."""
    table = communicator_state.c
    row = session.execute(select(table.value, table.updated_at)
                          .where(table.key == key)).first()
    if (row is None or row.value != value
            or row.updated_at < utcnow() - datetime.timedelta(seconds=every)):
        set_state(session, key, value)


def delete_state(session: Session, key: str) -> None:
    session.execute(communicator_state.delete().where(communicator_state.c.key == key))
    _changed(session)


def get_states(session: Session) -> dict[str, tuple[str | None, datetime.datetime]]:
    table = communicator_state.c
    return {row.key: (row.value, row.updated_at)
            for row in session.execute(select(table.key, table.value, table.updated_at))}
