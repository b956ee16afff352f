"""What operators ask of the queues: how deep, how old, what failed; and
the two things they do about failures: retry now, or give up on one."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import queues
from .models import inbound_messages, outbound_messages, utcnow

log = logging.getLogger(__name__)

OUT = outbound_messages.c
IN = inbound_messages.c


def _age(oldest) -> float | None:
    return None if oldest is None else round((utcnow() - oldest).total_seconds(), 3)


def _iso(value) -> str | None:
    return None if value is None else value.isoformat() + 'Z'


def _count(condition):
    """COUNT ... FILTER, spelled so that MariaDB understands it too."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _oldest(condition, column):
    return func.min(case((condition, column)))


def queue_status(session: Session, name: str, failures: int = 20) -> dict[str, Any]:
    """Queue depths, oldest pending ages, failures and last exchanges."""
    waiting = OUT.delivered_at.is_(None)
    out_pending, out_oldest, out_total = session.execute(
        select(_count(waiting), _oldest(waiting, OUT.created_at), func.count())
    ).one()
    pending = IN.processed_at.is_(None) & IN.given_up_at.is_(None)
    in_pending, in_oldest, in_failed, in_given_up, in_total = session.execute(
        select(_count(pending), _oldest(pending, IN.created_at),
               _count(pending & IN.failed_at.is_not(None)),
               _count(IN.given_up_at.is_not(None)), func.count())).one()
    failed_rows = session.execute(
        select(IN.id, IN.sender, IN.remote_id, IN.attempts, IN.last_error, IN.failed_at)
        .where(pending, IN.failed_at.is_not(None)).order_by(IN.id).limit(failures)).all()
    states = queues.get_states(session)
    # SUM() comes back as Decimal on MariaDB
    out_pending, out_total, in_pending, in_failed, in_given_up, in_total = map(
        int, (out_pending, out_total, in_pending, in_failed, in_given_up, in_total))
    return {
        'name': name,
        'outbound': {'pending': out_pending, 'oldest_pending_age_seconds': _age(out_oldest),
                     'total': out_total},
        'inbound': {'pending': in_pending, 'oldest_pending_age_seconds': _age(in_oldest),
                    'failed': in_failed, 'given_up': in_given_up, 'total': in_total},
        'failures': [{'id': r.id, 'sender': r.sender, 'remote_id': r.remote_id,
                      'attempts': r.attempts, 'error': r.last_error,
                      'failed_at': _iso(r.failed_at)} for r in failed_rows],
        'last_exchanges': {key: {'at': _iso(at), 'peer': value}
                           for key, (value, at) in sorted(states.items())},
    }


def format_status(status: dict[str, Any]) -> str:
    out, inb = status['outbound'], status['inbound']

    def age(seconds):
        return '-' if seconds is None else f'{seconds:.0f}s'

    lines = [
        f"communicator {status['name']}",
        f"outbound: {out['pending']} pending (oldest {age(out['oldest_pending_age_seconds'])}), "
        f"{out['total']} in all",
        f"inbound:  {inb['pending']} pending (oldest {age(inb['oldest_pending_age_seconds'])}), "
        f"{inb['failed']} failed, {inb['given_up']} given up, {inb['total']} in all",
    ]
    for key, value in status['last_exchanges'].items():
        peer = f" ({value['peer']})" if value['peer'] else ''
        lines.append(f"{key}: {value['at']}{peer}")
    for failure in status['failures']:
        error = (failure['error'] or '').splitlines()[0][:160] if failure['error'] else ''
        lines.append(f"failed #{failure['id']} (from {failure['sender']} "
                     f"#{failure['remote_id']}, {failure['attempts']} attempts): {error}")
    return '\n'.join(lines)


def give_up(session: Session, message_ids: Sequence[int], by: str, reason: str) -> int:
    """Stop retrying these inbound messages, recording who and why; later
    messages for the same records are then applied."""
    result = session.execute(
        update(inbound_messages)
        .where(IN.id.in_(list(message_ids)), IN.processed_at.is_(None),
               IN.given_up_at.is_(None))
        .values(given_up_at=utcnow(), given_up_by=by[:255], given_up_reason=reason))
    mark_changed(session)
    log.warning('%s gave up on inbound messages %s: %s', by, list(message_ids), reason)
    return result.rowcount


def revive(session: Session, message_ids: Sequence[int] | None) -> int:
    """Make given-up messages pending again, for an explicit retry."""
    statement = (update(inbound_messages)
                 .where(IN.processed_at.is_(None), IN.given_up_at.is_not(None))
                 .values(given_up_at=None, given_up_by=None, given_up_reason=None))
    if message_ids is not None:
        statement = statement.where(IN.id.in_(list(message_ids)))
    result = session.execute(statement)
    mark_changed(session)
    return result.rowcount
