"""What operators ask of the queues: how deep, how old, what failed; and
the two things they do about failures: retry now, or give up on one."""
from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import queues
from .models import communicator_conflicts, inbound_messages, outbound_messages, utcnow

log = logging.getLogger(__name__)

OUT = outbound_messages.c
IN = inbound_messages.c
CONFLICT = communicator_conflicts.c
#: Conflicts of the last this-many hours count as recent in ``--status``.
RECENT_HOURS = 24


def _age(oldest) -> float | None:
    return None if oldest is None else round((utcnow() - oldest).total_seconds(), 3)


def _iso(value) -> str | None:
    return None if value is None else value.isoformat() + 'Z'


def _count(condition):
    """COUNT ... FILTER, spelled so that MariaDB understands it too."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _oldest(condition, column):
    return func.min(case((condition, column)))


def queue_status(session: Session, name: str, failures: int = 20,
                 conflicts: int = 50) -> dict[str, Any]:
    """Queue depths, oldest pending ages, failures, refusals, conflicts and
    last exchanges."""
    waiting = OUT.delivered_at.is_(None)
    out_pending, out_oldest, out_total = session.execute(
        select(_count(waiting), _oldest(waiting, OUT.created_at), func.count())
    ).one()
    refused = IN.processed_at.is_(None) & IN.refused_at.is_not(None)
    pending = IN.processed_at.is_(None) & IN.given_up_at.is_(None) & IN.refused_at.is_(None)
    in_pending, in_oldest, in_failed, in_refused, in_given_up, in_total = session.execute(
        select(_count(pending), _oldest(pending, IN.created_at),
               _count(pending & IN.failed_at.is_not(None)), _count(refused),
               _count(IN.given_up_at.is_not(None)), func.count())).one()
    waiting_upgrade = int(session.execute(
        select(_count(pending & ~queues.understood()))).scalar_one())
    failed_rows = session.execute(
        select(IN.id, IN.sender, IN.remote_id, IN.attempts, IN.last_error, IN.failed_at,
               IN.refused_at)
        .where((pending & IN.failed_at.is_not(None)) | refused)
        .order_by(IN.id).limit(failures)).all()
    since = utcnow() - datetime.timedelta(hours=RECENT_HOURS)
    recent, conflict_total = session.execute(
        select(_count(CONFLICT.created_at >= since), func.count())
        .select_from(communicator_conflicts)).one()
    conflict_rows = session.execute(
        select(communicator_conflicts).order_by(CONFLICT.id.desc()).limit(conflicts)).all()
    states = queues.get_states(session)
    # SUM() comes back as Decimal on MariaDB
    (out_pending, out_total, in_pending, in_failed, in_refused, in_given_up, in_total,
     recent, conflict_total) = map(int, (out_pending, out_total, in_pending, in_failed,
                                         in_refused, in_given_up, in_total, recent,
                                         conflict_total))
    return {
        'name': name,
        'outbound': {'pending': out_pending, 'oldest_pending_age_seconds': _age(out_oldest),
                     'total': out_total},
        'inbound': {'pending': in_pending, 'oldest_pending_age_seconds': _age(in_oldest),
                    'failed': in_failed, 'refused': in_refused, 'given_up': in_given_up,
                    'waiting_upgrade': waiting_upgrade, 'total': in_total},
        'failures': [{'id': r.id, 'sender': r.sender, 'remote_id': r.remote_id,
                      'attempts': r.attempts, 'error': r.last_error,
                      'failed_at': _iso(r.failed_at), 'refused': r.refused_at is not None}
                     for r in failed_rows],
        'conflicts': {
            'recent': recent, 'recent_hours': RECENT_HOURS, 'total': conflict_total,
            'latest': [{'id': r.id, 'record': r.name, 'origin': r.origin,
                        'original_id': r.original_id, 'local_id': r.local_id,
                        'attribute': r.attribute, 'local_value': r.local_value,
                        'remote_value': r.remote_value, 'kept_value': r.kept_value,
                        'local_stamp': r.local_stamp, 'remote_stamp': r.remote_stamp,
                        'winner': r.winner, 'policy': r.policy, 'peer': r.peer,
                        'at': _iso(r.created_at)} for r in conflict_rows]},
        'last_exchanges': {key: {'at': _iso(at), 'peer': value}
                           for key, (value, at) in sorted(states.items())
                           if key.startswith('last_')},
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
        f"{inb['failed']} failed, {inb['refused']} refused, {inb['given_up']} given up, "
        + (f"{inb['waiting_upgrade']} waiting_upgrade (a newer format: upgrade this app), "
           if inb.get('waiting_upgrade') else '')
        + f"{inb['total']} in all",
        f"conflicts: {status['conflicts']['recent']} in the last "
        f"{status['conflicts']['recent_hours']}h, {status['conflicts']['total']} in all "
        "(--status --json lists them)",
    ]
    for key, value in status['last_exchanges'].items():
        peer = f" ({value['peer']})" if value['peer'] else ''
        lines.append(f"{key}: {value['at']}{peer}")
    for failure in status['failures']:
        error = (failure['error'] or '').splitlines()[0][:160] if failure['error'] else ''
        kind = 'refused' if failure['refused'] else 'failed'
        lines.append(f"{kind} #{failure['id']} (from {failure['sender']} "
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
    """Make given-up messages pending again, for an explicit retry; named
    refused messages too (the model may accept them now)."""
    statement = (update(inbound_messages)
                 .where(IN.processed_at.is_(None), IN.given_up_at.is_not(None))
                 .values(given_up_at=None, given_up_by=None, given_up_reason=None))
    if message_ids is not None:
        statement = statement.where(IN.id.in_(list(message_ids)))
    result = session.execute(statement)
    if message_ids is not None:
        result_refused = session.execute(
            update(inbound_messages)
            .where(IN.id.in_(list(message_ids)), IN.processed_at.is_(None),
                   IN.refused_at.is_not(None))
            .values(refused_at=None))
        mark_changed(session)
        return result.rowcount + result_refused.rowcount
    mark_changed(session)
    return result.rowcount
