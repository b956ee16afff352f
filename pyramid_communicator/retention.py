"""Bounded history: messages that have done their job are deleted once
they are older than ``communicator.retention_days``.

Deleted, each once older than the cut-off: outbound messages delivered,
inbound messages applied (by ``processed_at``), refused (by
``refused_at``), given up (by ``given_up_at``) or waiting for an upgrade
that never came (a newer format, by ``created_at``), and conflict
records.  A message that is refused or given up is done with too, and
one of a newer format still waiting after the retention period would
otherwise stay for ever; an operator who wants one kept acts within the
period (``--retry``, or an upgrade).  Kept: outbound messages not yet
delivered, inbound messages pending or failed and still retried (they
are work to do, however old: ``--give-up`` ends that, and the purge
then follows), and the mappings and tombstones, which records need for
as long as they exist (a tombstone is one small row per deleted record).

Deleting an inbound message must not let the same message in
again: before deleting, the highest id purged per sender is kept in
``communicator_state`` (``purged:<sender>``); a message at or below it is
not stored again (see :func:`.queues.store_inbound`), and the cursor
used against a gem server never goes back.  Rows go in pages of a few
hundred, each in a transaction of its own, so SQLite's write lock is
never held for long.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging

import transaction
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import queues
from .models import communicator_conflicts, inbound_messages, outbound_messages, utcnow
from .predicates import one_of

log = logging.getLogger(__name__)

#: Rows deleted per transaction.
PAGE = 500
#: How often a normal run (or the server, when central talks to it)
#: purges by itself.
AUTO_INTERVAL = datetime.timedelta(hours=1)
STATE_KEY = 'last_purge_at'


@dataclasses.dataclass
class PurgeResult:
    outbound: int = 0
    #: Inbound messages applied.
    inbound: int = 0
    conflicts: int = 0
    #: Inbound messages never applied: refused, given up, waiting for an
    #: upgrade.
    refused: int = 0
    given_up: int = 0
    waiting_upgrade: int = 0

    def __str__(self) -> str:
        return (f'purged outbound={self.outbound} inbound={self.inbound} '
                f'conflicts={self.conflicts} refused={self.refused} '
                f'given_up={self.given_up} waiting_upgrade={self.waiting_upgrade}')


def _delete_pages(session: Session, tm: transaction.TransactionManager, table,
                  stamp, condition) -> int:
    """Delete in pages, oldest first.  Ordered by ``stamp`` (then id), the
    page is a range of the index on ``stamp``: ordered by id alone, SQLite
    walked every row kept (a million, say) to find a few old ones."""
    deleted = 0
    while True:
        with tm:
            ids = session.execute(select(table.c.id).where(condition)
                                  .order_by(stamp, table.c.id).limit(PAGE)).scalars().all()
            if ids:
                session.execute(delete(table).where(
                    one_of(table.c.id, ids, session.get_bind().dialect.name)))
                mark_changed(session)
        deleted += len(ids)
        if len(ids) < PAGE:
            return deleted


def _inbound_done(cutoff: datetime.datetime) -> dict[str, tuple]:
    """Per kind of inbound message done with: (the stamp it is ordered by,
    the condition that it is older than ``cutoff``).  Those never applied
    start with ``processed_at IS NULL``, the range of the pending index,
    so the database looks at unapplied rows only."""
    IN = inbound_messages.c
    unapplied = IN.processed_at.is_(None)
    return {
        'inbound': (IN.processed_at, IN.processed_at.is_not(None) & (IN.processed_at < cutoff)),
        'refused': (IN.processed_at, unapplied & IN.refused_at.is_not(None)
                    & (IN.refused_at < cutoff)),
        'given_up': (IN.processed_at, unapplied & IN.refused_at.is_(None)
                     & IN.given_up_at.is_not(None) & (IN.given_up_at < cutoff)),
        'waiting_upgrade': (IN.processed_at, unapplied & IN.refused_at.is_(None)
                            & IN.given_up_at.is_(None) & ~queues.understood()
                            & (IN.created_at < cutoff)),
    }


def purge(session: Session, tm: transaction.TransactionManager,
          older_than_days: float) -> PurgeResult:
    """Delete what is done with and older than ``older_than_days``."""
    cutoff = utcnow() - datetime.timedelta(days=older_than_days)
    IN, OUT, CONFLICT = inbound_messages.c, outbound_messages.c, communicator_conflicts.c
    done = _inbound_done(cutoff)
    with tm:
        # Every row about to go, whatever its kind, raises its sender's
        # watermark first: none of them may be stored again.
        highest: dict[str, int] = {}
        for _, condition in done.values():
            for sender, remote_id in session.execute(
                    select(IN.sender, func.max(IN.remote_id))
                    .where(condition).group_by(IN.sender)):
                highest[sender] = max(highest.get(sender, 0), remote_id)
        for sender, remote_id in highest.items():
            queues.raise_purged_watermark(session, sender, remote_id)
    result = PurgeResult(
        outbound=_delete_pages(session, tm, outbound_messages, OUT.delivered_at,
                               OUT.delivered_at < cutoff),
        conflicts=_delete_pages(session, tm, communicator_conflicts, CONFLICT.created_at,
                                CONFLICT.created_at < cutoff))
    for kind, (stamp, condition) in done.items():
        setattr(result, kind, _delete_pages(session, tm, inbound_messages, stamp, condition))
    with tm:
        queues.set_state(session, STATE_KEY)
    log.info('%s (older than %g days)', result, older_than_days)
    return result


def purge_if_due(session: Session, tm: transaction.TransactionManager,
                 retention_days: int) -> PurgeResult | None:
    """Purge at most once per :data:`AUTO_INTERVAL`; ``retention_days`` 0
    keeps everything."""
    if retention_days <= 0:
        return None
    with tm:
        last = queues.get_states(session).get(STATE_KEY)
    if last is not None and utcnow() - last[1] < AUTO_INTERVAL:
        return None
    return purge(session, tm, retention_days)
