"""Outbound messages the peer refuses for good: set aside, so that one
message can no longer wedge every push.

A message is refused for good when sending it again cannot help: it is
larger than the peer accepts (HTTP 413, or larger than our own
``communicator.max_body_bytes`` on its own), or the peer calls it invalid
(a 4xx other than 401/403, 408 and 429) when it is pushed alone.  A push
that meets such a refusal splits the batch in halves until it has the one
message, then sets it aside (``failed_at``, ``last_error``, ``attempts``)
and goes on with the rest.

Set aside is not dropped: later messages of the same record (record name,
origin and original id) wait behind it, since sending them would let the
peer see the record's edits out of order or with one missing.  Other
records go on.  An operator decides what happens next
(``pcommunicate --retry-outbound``: it goes with the next push, once the
peer was fixed; ``--give-up-outbound``: it never goes, and the record's
later messages follow).

Transient failures (time-outs, connection errors, 5xx, 401/403, 408, 429)
are not recorded here: they fail the run, which the next one repeats.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from .models import outbound_messages, utcnow
from .predicates import one_of
from .records import NAME_PREFIX, body_name

log = logging.getLogger(__name__)

OUT = outbound_messages.c

#: 4xx answers that say nothing about the message: credentials (401,
#: 403), a slow request (408) and throttling (429) go again next run.
TRANSIENT_4XX = frozenset({401, 403, 408, 429})

#: A record as the wire names it: (record name, origin, original id).
Identity = tuple[str, str, int]

#: Set aside and waiting for an operator.
SET_ASIDE = (OUT.delivered_at.is_(None) & OUT.failed_at.is_not(None)
             & OUT.given_up_at.is_(None))
#: Given up on: never sent (and counted neither as pending nor as failed).
GIVEN_UP = OUT.delivered_at.is_(None) & OUT.given_up_at.is_not(None)
#: What the push sends (or holds back behind a set-aside message).
PENDING = OUT.delivered_at.is_(None) & OUT.failed_at.is_(None) & OUT.given_up_at.is_(None)

def refused_for_good(status: int) -> bool:
    """Does an HTTP error ``status`` to a push of one message mean that
    the peer will never take that message?"""
    return 400 <= status < 500 and status not in TRANSIENT_4XX


def identity(body: str, origin: str | None, original_id: int | None,
             local_name: str) -> Identity | None:
    """The record a message is about, as the wire names it (a NULL origin
    is this app); None when it cannot be told (no id: it holds nothing
    back, and nothing waits for it)."""
    if original_id is None:
        return None
    name = body_name(body)
    if name is None:
        return None
    return (name, origin or local_name, original_id)


@dataclasses.dataclass(frozen=True)
class SetAside:
    """A message the peer refused for good, and why (one line)."""
    message_id: int
    reason: str


def held_identities(session: Session, local_name: str) -> set[Identity]:
    """The records whose later messages wait behind a set-aside one.  Set
    aside messages are few: read on each push, without their bodies."""
    rows = session.execute(
        select(OUT.origin, OUT.original_id,
               func.substr(OUT.body, 1, NAME_PREFIX).label('head'))
        .where(SET_ASIDE, OUT.original_id.is_not(None))).all()
    found = {identity(row.head, row.origin, row.original_id, local_name) for row in rows}
    found.discard(None)
    return found  # type: ignore[return-value]


def record(session: Session, refused: Iterable[SetAside]) -> int:
    """Set these messages aside (unless meanwhile delivered or given up)."""
    now = utcnow()
    count = 0
    for item in refused:
        result = session.execute(
            update(outbound_messages)
            .where(OUT.id == item.message_id, OUT.delivered_at.is_(None),
                   OUT.given_up_at.is_(None))
            .values(attempts=func.coalesce(OUT.attempts, 0) + 1,
                    last_error=item.reason[:4000], failed_at=now))
        count += result.rowcount
    mark_changed(session)
    return count


def retry(session: Session, message_ids: Collection[int] | None) -> int:
    """Let set-aside messages go with the next push (all, or those of
    ``message_ids``; given-up ones named there are revived too).  Returns
    how many were."""
    statement = update(outbound_messages).values(
        failed_at=None, given_up_at=None, given_up_by=None, given_up_reason=None)
    if message_ids is None:
        statement = statement.where(SET_ASIDE)
    else:
        statement = statement.where(
            one_of(OUT.id, list(message_ids), session.get_bind().dialect.name),
            OUT.delivered_at.is_(None),
            OUT.failed_at.is_not(None) | OUT.given_up_at.is_not(None))
    result = session.execute(statement)
    mark_changed(session)
    if result.rowcount:
        log.warning('outbound messages set aside go again with the next push: %s',
                    'all' if message_ids is None else sorted(message_ids))
    return result.rowcount


def give_up(session: Session, message_ids: Sequence[int], by: str, reason: str) -> int:
    """Never send these set-aside messages, recording who and why; the
    later messages of their records then go.  Only set-aside messages can
    be given up on: a pending one may be on the wire this very moment."""
    result = session.execute(
        update(outbound_messages)
        .where(one_of(OUT.id, list(message_ids), session.get_bind().dialect.name),
               SET_ASIDE)
        .values(given_up_at=utcnow(), given_up_by=by[:255], given_up_reason=reason))
    mark_changed(session)
    log.warning('%s gave up on outbound messages %s: %s', by, list(message_ids), reason)
    return result.rowcount


def listed(session: Session, local_name: str, limit: int) -> list[dict[str, Any]]:
    """The latest ``limit`` set-aside messages, oldest first, for
    ``--status`` and ``/status.json``."""
    rows = session.execute(
        select(OUT.id, OUT.origin, OUT.original_id, OUT.attempts, OUT.last_error,
               OUT.failed_at, func.substr(OUT.body, 1, NAME_PREFIX).label('head'))
        .where(SET_ASIDE).order_by(OUT.id.desc()).limit(limit)).all()
    return [{'id': row.id, 'record': body_name(row.head),
             'origin': row.origin or local_name, 'original_id': row.original_id,
             'attempts': row.attempts or 0, 'error': row.last_error,
             'failed_at': None if row.failed_at is None else row.failed_at.isoformat() + 'Z'}
            for row in reversed(rows)]
