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
then follows), and the mappings of records that exist.  Tombstones
(the mappings and natural keys of deleted records) go too, once their
delete is older than the cut-off and the peer has it
(:mod:`.tombstones`).

Deleting an inbound message must not let the same message in
again: before deleting, the highest id purged per sender is kept in
``communicator_state`` (``purged:<sender>``); a message at or below it is
not stored again (see :func:`.queues.store_inbound`), and the cursor
used against a gem server never goes back.  The watermark is raised in
the transaction that deletes the page.  Rows go in pages of a few
hundred, each in a transaction of its own, so SQLite's write lock is
never held for long.

The server purges in slices (:func:`purge_if_due` with ``stop``): a
request that must answer within the client's timeout deletes a page at
least and stops once ``stop`` says so; where it stopped is kept
(``purge_resume`` in ``communicator_state``) and the next request goes
on from there, until a purge is complete and the next is due an hour
later.  ``pcommunicate --purge`` and normal runs purge everything at once.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable

import transaction
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import queues, tombstones
from .models import communicator_conflicts, inbound_messages, outbound_messages, utcnow
from .predicates import one_of

log = logging.getLogger(__name__)

#: Rows deleted per transaction.
PAGE = 500
#: How often a normal run (or the server, when central talks to it)
#: purges by itself.
AUTO_INTERVAL = datetime.timedelta(hours=1)
STATE_KEY = 'last_purge_at'
#: Where an unfinished purge goes on: ``<step>`` or ``<step>:<position>``.
RESUME_KEY = 'purge_resume'


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
    #: Tombstones: mappings of deleted records, and natural keys deleted.
    tombstones: int = 0
    natural_tombstones: int = 0
    #: False: stopped by ``stop`` with more to purge (the next call goes on).
    finished: bool = True

    def __str__(self) -> str:
        return (f'purged outbound={self.outbound} inbound={self.inbound} '
                f'conflicts={self.conflicts} refused={self.refused} '
                f'given_up={self.given_up} waiting_upgrade={self.waiting_upgrade} '
                f'tombstones={self.tombstones} natural_tombstones={self.natural_tombstones}'
                + ('' if self.finished else ' unfinished=1'))


#: One page of a step: (rows deleted, the next page's position, or None
#: when the step is done).
Step = Callable[[Session, str | None], tuple[int, str | None]]


def _delete_page(table, stamp, condition, watermark: bool = False) -> Step:
    """A step deleting ``condition``'s rows, oldest first.  Ordered by
    ``stamp`` (then id), the page is a range of the index on ``stamp``:
    ordered by id alone, SQLite walked every row kept (a million, say) to
    find a few old ones.  ``watermark``: inbound messages, whose senders'
    watermarks are raised first, in the same transaction."""
    def page(session: Session, position: str | None) -> tuple[int, str | None]:
        rows = session.execute(select(table.c.id, *((table.c.sender, table.c.remote_id)
                                                    if watermark else ()))
                               .where(condition).order_by(stamp, table.c.id)
                               .limit(PAGE)).all()
        if not rows:
            return 0, None
        if watermark:  # none of them may be stored again
            highest: dict[str, int] = {}
            for row in rows:
                highest[row.sender] = max(highest.get(row.sender, 0), row.remote_id)
            for sender, remote_id in highest.items():
                queues.raise_purged_watermark(session, sender, remote_id)
        session.execute(delete(table).where(
            one_of(table.c.id, [row.id for row in rows], session.get_bind().dialect.name)))
        mark_changed(session)
        return len(rows), ('' if len(rows) == PAGE else None)
    return page


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


def _steps(cutoff: datetime.datetime) -> list[tuple[str, Step]]:
    """What a purge does, in order: (the result's field, its step)."""
    OUT, CONFLICT = outbound_messages.c, communicator_conflicts.c
    steps = [('outbound', _delete_page(outbound_messages, OUT.delivered_at,
                                       OUT.delivered_at < cutoff)),
             ('conflicts', _delete_page(communicator_conflicts, CONFLICT.created_at,
                                        CONFLICT.created_at < cutoff))]
    steps += [(kind, _delete_page(inbound_messages, stamp, condition, watermark=True))
              for kind, (stamp, condition) in _inbound_done(cutoff).items()]

    def mappings(session: Session, position: str | None) -> tuple[int, str | None]:
        page = tombstones.purge_page(session, cutoff, position, PAGE)
        return page.deleted, page.position

    def natural(session: Session, position: str | None) -> tuple[int, str | None]:
        page = tombstones.purge_natural_page(session, cutoff, position, PAGE)
        return page.deleted, page.position
    return steps + [('tombstones', mappings), ('natural_tombstones', natural)]


def purge(session: Session, tm: transaction.TransactionManager,
          older_than_days: float, stop: Callable[[], bool] | None = None,
          resume: bool = False) -> PurgeResult:
    """Delete what is done with and older than ``older_than_days``.

    ``stop``: asked after every page (so a call deletes one page at
    least); True ends the call, and where it stopped is kept for the next
    call with ``resume``, which goes on from there."""
    cutoff = utcnow() - datetime.timedelta(days=older_than_days)
    steps = _steps(cutoff)
    start, position = 0, None
    if resume:
        with tm:
            saved = queues.get_states(session).get(RESUME_KEY)
        if saved is not None and saved[0]:
            number, _, rest = saved[0].partition(':')
            if number.isdigit() and int(number) < len(steps):
                start, position = int(number), rest or None
    result = PurgeResult()
    for number in range(start, len(steps)):
        kind, step = steps[number]
        while True:
            with tm:
                deleted, position = step(session, position)
                if stop is not None and stop() and (position is not None
                                                    or number + 1 < len(steps)):
                    # Where the next call goes on, with the page's deletes.
                    following = (f'{number}:{position}' if position is not None
                                 else str(number + 1))
                    queues.set_state(session, RESUME_KEY, following)
                    result.finished = False
            setattr(result, kind, getattr(result, kind) + deleted)
            if not result.finished:
                log.info('%s (older than %g days)', result, older_than_days)
                return result
            if position is None:
                break
    with tm:
        queues.delete_state(session, RESUME_KEY)
        queues.set_state(session, STATE_KEY)
    log.info('%s (older than %g days)', result, older_than_days)
    return result


def purge_if_due(session: Session, tm: transaction.TransactionManager,
                 retention_days: int, stop: Callable[[], bool] | None = None,
                 ) -> PurgeResult | None:
    """Purge at most once per :data:`AUTO_INTERVAL` (an unfinished purge
    goes on at every call, with ``stop``: see :func:`purge`);
    ``retention_days`` 0 keeps everything."""
    if retention_days <= 0:
        return None
    with tm:
        states = queues.get_states(session)
    last = states.get(STATE_KEY)
    unfinished = RESUME_KEY in states
    if not unfinished and last is not None and utcnow() - last[1] < AUTO_INTERVAL:
        return None
    return purge(session, tm, retention_days, stop=stop, resume=unfinished)
