"""Applying stored inbound messages, one transaction per message.

Savepoints would be cheaper but zope.sqlalchemy turns them off on SQLite;
a transaction of its own per message works everywhere and lets several
workers or runs apply the same queue at once (see ``queues.claim_inbound``).
A message that fails is kept with its error and retried on later runs
(one the peer was not allowed to send is kept as refused, not retried);
later messages for the same record wait behind it so that updates are
never applied out of order, while other records go on.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Sequence

import transaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import queues
from .applying import Message, Refused, apply_message
from .models import utcnow
from .records import decode_body

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ApplyResult:
    applied: int = 0
    failed: int = 0
    waiting: int = 0

    def __iadd__(self, other: ApplyResult) -> ApplyResult:
        self.applied += other.applied
        self.failed += other.failed
        self.waiting += other.waiting
        return self


def _record_key(row, local_name: str) -> tuple | None:
    if row.original_id is None:
        return None  # a record without identity is always a record of its own
    try:
        name, _ = decode_body(row.body)
    except ValueError:
        return None
    return name, row.origin or local_name, row.original_id


def _describe(exc: BaseException) -> str:
    """The error to keep with the message: the database's own words for a
    database error, without the statement and its parameters (the record's
    values), which SQLAlchemy appends."""
    notes = ''.join(f' ({note})' for note in getattr(exc, '__notes__', ()))
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        return f'{type(exc).__name__}: {exc.orig}{notes}'
    return f'{type(exc).__name__}: {exc}{notes}'


def apply_pending(session: Session, tm: transaction.TransactionManager,
                  local_name: str, batch_size: int,
                  ids: Sequence[int] | None = None,
                  retry_delay: float = 0) -> ApplyResult:
    """Apply pending inbound messages in id order, in batches.

    A message that failed less than ``retry_delay`` seconds ago is not
    tried again yet (a server applies on every request of a run, and a
    hopeless message should not cost each of them); it still holds back
    later messages for its record.

    ``session`` must be registered with ``tm`` (zope.sqlalchemy) and must
    not be the session of a request in progress: every message is
    committed or rolled back on its own.
    """
    result = ApplyResult()
    blocked: set[tuple] = set()
    after = 0
    retry_before = utcnow() - datetime.timedelta(seconds=retry_delay)
    while True:
        with tm:
            rows = queues.pending_inbound(session, batch_size, after, ids)
        for row in rows:
            after = row.id
            key = _record_key(row, local_name)
            if key is not None and key in blocked:
                result.waiting += 1
                continue
            if row.failed_at is not None and row.failed_at > retry_before:
                result.waiting += 1
                if key is not None:
                    blocked.add(key)
                continue
            try:
                with tm:
                    if not queues.claim_inbound(session, row.id):
                        continue  # another worker applied it meanwhile
                    apply_message(session, local_name, Message(
                        row.sender, row.body, row.origin, row.original_id,
                        json.loads(row.refs) if row.refs else None,
                        json.loads(row.version) if row.version else None))
            except Refused as exc:
                # The peer may not do this: kept with the reason, never
                # retried by itself, and it holds nothing else back.
                log.warning('inbound message %s refused: %s', row.id, exc)
                with tm:
                    queues.record_refusal(session, row.id, f'refused: {exc}')
                result.failed += 1
            except Exception as exc:
                # Log the kind of error only: the text may quote record values.
                log.warning('inbound message %s failed: %s', row.id, type(exc).__name__)
                log.debug('inbound message %s failed', row.id, exc_info=True)
                with tm:
                    queues.record_failure(session, row.id, _describe(exc))
                result.failed += 1
                if key is not None:
                    blocked.add(key)
            else:
                result.applied += 1
        if len(rows) < batch_size:
            return result
