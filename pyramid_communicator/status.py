"""What operators ask of the queues: how deep, how old, what failed; and
the two things they do about failures: retry now, or give up on one.

One function, :func:`queue_status`, computes a side's status: ``pcommunicate
--status`` shows it for the local app, and ``GET /status.json`` serves it
so that central can show (and ``--drain`` can check) the facade's too.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import outbound_failures, queues
from .client import Client, PeerError
from .echoes import ID_TAKEN, NOT_VERIFIED, TAKEN_BACK_KEY
from .models import communicator_conflicts, inbound_messages, outbound_messages, utcnow
from .printable import printable
from .restores import RESTORE_KEY
from .retries import Backoff

log = logging.getLogger(__name__)

OUT = outbound_messages.c
IN = inbound_messages.c
CONFLICT = communicator_conflicts.c
#: Conflicts of the last this-many hours count as recent in ``--status``.
RECENT_HOURS = 24

#: Inbound messages that wait for their turn (``queues.pending_inbound``).
_PENDING = IN.processed_at.is_(None) & IN.given_up_at.is_(None) & IN.refused_at.is_(None)
_REFUSED = IN.processed_at.is_(None) & IN.refused_at.is_not(None)


def _inbound_counts() -> dict[str, Any]:
    """The inbound counts of a status, in the order shown: one entry per
    count (a new kind of message held back is one more line here)."""
    return {
        'pending': _PENDING,
        'failed': _PENDING & IN.failed_at.is_not(None),
        'refused': _REFUSED,
        'given_up': IN.given_up_at.is_not(None),
        'waiting_upgrade': _PENDING & ~queues.understood(),
    }


#: What ``--drain`` waits for, per side: (queue, count, words).  Counts a
#: side does not report (an older peer) are taken as 0.
LEFT_BY_DRAIN = (
    ('outbound', 'pending', 'outbound pending'),
    ('outbound', 'failed', 'outbound set aside'),
    ('inbound', 'pending', 'inbound pending'),
    ('inbound', 'failed', 'failed'),
    ('inbound', 'waiting_upgrade', 'waiting for an upgrade'),
)
#: Counts that no further exchange clears: only an operator (or an upgrade).
STUCK = ('failed', 'waiting_upgrade')


def _age(oldest) -> float | None:
    return None if oldest is None else round((utcnow() - oldest).total_seconds(), 3)


def _iso(value) -> str | None:
    return None if value is None else value.isoformat() + 'Z'


def _count(condition):
    """COUNT ... FILTER, spelled so that MariaDB understands it too."""
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _oldest(condition, column):
    return func.min(case((condition, column)))


def queue_status(session: Session, name: str, failures: int = 50,
                 conflicts: int = 50, backoff: Backoff | None = None) -> dict[str, Any]:
    """Queue depths, oldest pending ages, failures (the latest
    ``failures``), refusals, conflicts and last exchanges: read-only, in
    the caller's transaction.  With ``backoff`` (the app's retry
    settings), each failure says when it is due to be tried again
    (``next_attempt_at``; None when not known, and for a refusal, which
    is never retried by itself)."""
    waiting = outbound_failures.PENDING
    out_pending, out_oldest, out_failed, out_given_up, out_total = session.execute(
        select(_count(waiting), _oldest(waiting, OUT.created_at),
               _count(outbound_failures.SET_ASIDE), _count(outbound_failures.GIVEN_UP),
               func.count())
    ).one()
    counts = _inbound_counts()
    *in_counts, in_oldest, in_total = session.execute(
        select(*map(_count, counts.values()), _oldest(_PENDING, IN.created_at),
               func.count())).one()
    failed_rows = session.execute(
        select(IN.id, IN.sender, IN.remote_id, IN.attempts, IN.last_error, IN.failed_at,
               IN.refused_at)
        .where((_PENDING & IN.failed_at.is_not(None)) | _REFUSED)
        .order_by(IN.id.desc()).limit(failures)).all()
    since = utcnow() - datetime.timedelta(hours=RECENT_HOURS)
    recent, conflict_total = session.execute(
        select(_count(CONFLICT.created_at >= since), func.count())
        .select_from(communicator_conflicts)).one()
    conflict_rows = session.execute(
        select(communicator_conflicts).order_by(CONFLICT.id.desc()).limit(conflicts)).all()
    states = queues.get_states(session)
    last_run = states.get(queues.LAST_RUN_KEY)
    # SUM() comes back as Decimal on MariaDB
    inbound = {key: int(value) for key, value in zip(counts, in_counts, strict=True)}
    inbound['oldest_pending_age_seconds'] = _age(in_oldest)
    inbound['total'] = int(in_total)
    report = {
        'name': name,
        # pending: goes with the next push, or waits behind a set-aside
        # message of its record; failed: set aside, for an operator.
        'outbound': {'pending': int(out_pending),
                     'oldest_pending_age_seconds': _age(out_oldest),
                     'total': int(out_total), 'failed': int(out_failed),
                     'given_up': int(out_given_up)},
        'inbound': inbound,
        'failures': [{'id': r.id, 'sender': r.sender, 'remote_id': r.remote_id,
                      'attempts': r.attempts, 'error': r.last_error,
                      'failed_at': _iso(r.failed_at), 'refused': r.refused_at is not None,
                      'next_attempt_at': _next_attempt(r, backoff)}
                     for r in reversed(failed_rows)],
        'outbound_failures': outbound_failures.listed(session, name, failures),
        'conflicts': {
            'recent': int(recent), 'recent_hours': RECENT_HOURS,
            'total': int(conflict_total),
            'latest': [{'id': r.id, 'record': r.name, 'origin': r.origin,
                        'original_id': r.original_id, 'local_id': r.local_id,
                        'attribute': r.attribute, 'local_value': r.local_value,
                        'remote_value': r.remote_value, 'kept_value': r.kept_value,
                        'local_stamp': r.local_stamp, 'remote_stamp': r.remote_stamp,
                        'winner': r.winner, 'policy': r.policy, 'peer': r.peer,
                        'at': _iso(r.created_at)} for r in conflict_rows]},
        'last_exchanges': {key: {'at': _iso(at), 'peer': value}
                           for key, (value, at) in sorted(states.items())
                           if key.startswith('last_') and key.endswith('_at')},
        'last_run': None if last_run is None else {'at': _iso(last_run[1]),
                                                   'result': last_run[0]},
        # pcommunicate --verify and --repair (central), a repair's
        # re-publishing asked of this side (a facade).
        **{key: {'at': _iso(states[key][1]), 'result': states[key][0]}
           for key in CHECK_KEYS if key in states},
    }
    restore = states.get(RESTORE_KEY)
    if restore is not None:  # only once one was detected
        report['last_restore'] = {'at': _iso(restore[1]), 'what': restore[0]}
    taken_back = states.get(TAKEN_BACK_KEY)
    # Echoes whose signature did not verify, and genuine ones whose id a
    # record made after the restore took (by their reasons: a peer's plain
    # message of our origin carries its own signature, and is not counted).
    refused_echoes, ids_taken = (session.execute(
        select(func.count()).where(_REFUSED, IN.signature.is_not(None),
                                   IN.last_error.like(f'%{reason}%'))).scalar_one()
        for reason in (NOT_VERIFIED, ID_TAKEN))
    if taken_back is not None or refused_echoes or ids_taken:
        report['echoes'] = {
            'taken_back': int(taken_back[0]) if taken_back and (taken_back[0] or '').isdigit()
            else 0,
            'last_at': _iso(taken_back[1]) if taken_back else None,
            'refused': int(refused_echoes), 'ids_taken': int(ids_taken)}
    return report


#: State rows of ``--verify`` and ``--repair`` that ``--status`` shows.
CHECK_KEYS = ('last_verify', 'last_repair')


def _next_attempt(row, backoff: Backoff | None) -> str | None:
    if backoff is None or row.refused_at is not None or row.failed_at is None:
        return None
    return _iso(backoff.due_at(row.failed_at, row.attempts))


def _when(next_attempt_at: object) -> str:
    """``, next attempt in 90s``: how long a failure waits (back-off).
    Nothing for a value that is not a time (the peer's status may hold
    anything)."""
    if not isinstance(next_attempt_at, str) or not next_attempt_at:
        return ''
    try:
        due = datetime.datetime.fromisoformat(next_attempt_at[:40].removesuffix('Z'))
    except ValueError:
        return ''
    if due.tzinfo is not None:
        due = due.astimezone(datetime.UTC).replace(tzinfo=None)
    seconds = (due - utcnow()).total_seconds()
    return ', next attempt due now' if seconds <= 0 else f', next attempt in {seconds:.0f}s'


def _words(key: str) -> str:
    if key == 'waiting_upgrade':
        return 'waiting for an upgrade (a newer format: upgrade this app)'
    return printable(key.replace('_', ' '), 40)


def format_status(status: dict[str, Any], title: str | None = None) -> str:
    """The status as lines for a terminal.  It may be the peer's, which
    can send anything: a part missing or of the wrong type shows as a line
    saying so (a count as ``?``), and every string is shown through
    :func:`.printable.printable`, as are ours (they may quote the peer)."""
    lines = [title or f"communicator {printable(status.get('name'), 64)}"]
    out = _part(status, 'outbound')
    if out is None:
        lines.append('outbound: not reported')
    else:
        # Counts of set-aside and given-up messages are news only when
        # there are any (and absent from an older peer's status).
        counts = [f'{_number(out[key])} {words}, ' for key, words in
                  (('failed', 'set aside'), ('given_up', 'given up')) if out.get(key)]
        lines.append(f"outbound: {_number(out.get('pending'))} pending (oldest "
                     f"{_age_text(out.get('oldest_pending_age_seconds'))}), "
                     + ''.join(counts) + f"{_number(out.get('total'))} in all")
    inb = _part(status, 'inbound')
    if inb is None:
        lines.append('inbound:  not reported')
    else:
        # waiting_upgrade is news only when there are any
        counts = [f'{_number(value)} {_words(key)}' for key, value in
                  list(inb.items())[:_MAX_COUNTS]
                  if key not in ('pending', 'oldest_pending_age_seconds', 'total')
                  and (value or key != 'waiting_upgrade')]
        lines.append(f"inbound:  {_number(inb.get('pending'))} pending (oldest "
                     f"{_age_text(inb.get('oldest_pending_age_seconds'))}), "
                     + ''.join(f'{count}, ' for count in counts)
                     + f"{_number(inb.get('total'))} in all")
    conflicts = _part(status, 'conflicts')
    if conflicts is None:
        lines.append('conflicts: not reported')
    else:
        lines.append(f"conflicts: {_number(conflicts.get('recent'))} in the last "
                     f"{_number(conflicts.get('recent_hours'))}h, "
                     f"{_number(conflicts.get('total'))} in all (--status --json lists them)")
    for key, value in list((_part(status, 'last_exchanges') or {}).items())[:_MAX_ROWS]:
        value = value if isinstance(value, dict) else {}
        peer = f" ({printable(value['peer'], 80)})" if value.get('peer') else ''
        lines.append(f"{printable(key, 40)}: {printable(value.get('at'), 40)}{peer}")
    last_run = _part(status, 'last_run')
    if last_run:
        lines.append(f"last run: {printable(last_run.get('at'), 40)} "
                     f"{printable(last_run.get('result'), 300)}")
    for key in CHECK_KEYS:
        check = _part(status, key)
        if check:
            lines.append(f"{key.replace('_', ' ')}: {printable(check.get('at'), 40)} "
                         f"{printable(check.get('result'), 300)}")
    restore = _part(status, 'last_restore')
    if restore:
        lines.append(f"restore detected: {printable(restore.get('at'), 40)} "
                     f"{printable(restore.get('what'), 300)}")
    echoes = _part(status, 'echoes')
    if echoes:
        lines.append(f"echoes: {_number(echoes.get('taken_back'))} of our own messages taken "
                     f"back from the peer (last {printable(echoes.get('last_at'), 40)}), "
                     f"{_number(echoes.get('refused'))} refused (signature did not verify)")
        if _is_count(echoes.get('ids_taken')) and echoes['ids_taken'] > 0:
            lines.append(f"echoes: {_number(echoes.get('ids_taken'))} of our lost records not "
                         "taken back: a record made here after the restore took their id "
                         "(see the refused inbound messages)")
    failures = status.get('failures')
    for failure in (failures if isinstance(failures, list) else [])[:_MAX_ROWS]:
        if not isinstance(failure, dict):
            lines.append('a failure the status does not describe')
            continue
        kind = 'refused' if failure.get('refused') else 'failed'
        lines.append(f"{kind} #{_number(failure.get('id'))} (from "
                     f"{printable(failure.get('sender'), 80)} "
                     f"#{_number(failure.get('remote_id'))}, "
                     f"{_number(failure.get('attempts'))} attempts"
                     f"{_when(failure.get('next_attempt_at'))}): "
                     f"{_first_line(failure.get('error'))}")
    set_aside = status.get('outbound_failures')
    for failure in (set_aside if isinstance(set_aside, list) else [])[:_MAX_ROWS]:
        if not isinstance(failure, dict):
            lines.append('an outbound failure the status does not describe')
            continue
        lines.append(f"set aside outbound #{_number(failure.get('id'))} "
                     f"({printable(failure.get('record'), 64)} "
                     f"{printable(failure.get('origin'), 64)}"
                     f"#{_number(failure.get('original_id'))}, "
                     f"{_number(failure.get('attempts'))} attempts): "
                     f"{_first_line(failure.get('error'))}")
    return '\n'.join(lines)


#: At most this many inbound counts, exchanges and failures are shown (a
#: status of ours has a few, and 50 failures).
_MAX_COUNTS, _MAX_ROWS = 20, 100


def _part(status: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = status.get(key)
    return value if isinstance(value, dict) else None


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value: Any) -> str:
    """A count as shown: ``?`` for anything else (missing, wrong type)."""
    return str(value) if _is_count(value) and value < 10 ** 18 else '?'


def _age_text(seconds: Any) -> str:
    if seconds is None:
        return '-'
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) \
            and 0 <= seconds < 10 ** 12:
        return f'{seconds:.0f}s'
    return '?'


def _first_line(error: Any, width: int = 160) -> str:
    if not isinstance(error, str):
        return printable(error, width)
    lines = error[:width * 4].splitlines()
    return printable(lines[0], width) if lines else ''


# -- the peer's side ------------------------------------------------------------

#: ``PeerStatus.state``: the peer answered with its status; it has no
#: status route (the Ruby gem, or a version before 0.2.0); it could not be
#: asked (unreachable, credentials refused, an HTTP error).
OK, NOT_AVAILABLE, FAILED = 'ok', 'not available', 'unreachable'


@dataclasses.dataclass
class PeerStatus:
    url: str
    state: str
    status: dict[str, Any] | None = None
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {'url': self.url, 'state': self.state, 'error': self.error,
                'status': self.status}


def peer_name(status: dict[str, Any]) -> str:
    """The name a status gives, safe to show."""
    return printable(status.get('name'), 64) or 'peer'


def peer_status(client: Client) -> PeerStatus:
    """Ask the peer for its status over HTTP.  Call it with no database
    transaction open."""
    try:
        status = client.status()
    except PeerError as exc:
        return PeerStatus(client.base_uri, FAILED, error=str(exc))
    if status is None:
        return PeerStatus(client.base_uri, NOT_AVAILABLE,
                          error=f'{client.status_url} does not exist (HTTP 404)')
    return PeerStatus(client.base_uri, OK, status=status)


def format_peer_status(peer: PeerStatus) -> str:
    if peer.state == OK:
        return format_status(peer.status, f"communicator {peer_name(peer.status)} "
                                          f"(peer, {peer.url})")
    if peer.state == NOT_AVAILABLE:
        return (f'peer {peer.url}: status not available (it serves no /status.json: '
                'the Ruby gem, or pyramid_communicator before 0.2.0)')
    return f'peer {peer.url}: status unreachable: {printable(peer.error, 500)}'


# -- what a drain waits for --------------------------------------------------------

def left_in(status: dict[str, Any]) -> tuple[list[str], bool]:
    """What keeps this side from being drained, in words (empty when it
    is drained), and whether any of it is stuck (no exchange clears it)."""
    words, stuck = [], False
    for queue, key, text in LEFT_BY_DRAIN:
        count = (_part(status, queue) or {}).get(key, 0)
        if not count:
            continue
        # A count the peer garbled cannot show it drained: left, unknown.
        stuck = stuck or key in STUCK
        words.append(f'{_number(count)} {text}')
        failures = status.get('failures')
        if queue == 'inbound' and key == 'failed' and isinstance(failures, list):
            failed = [f for f in failures[:_MAX_ROWS]
                      if isinstance(f, dict) and not f.get('refused')]
            if failed:
                first = failed[0]
                words[-1] += (f" (id {_number(first.get('id'))}: "
                              f"{_first_line(first.get('error'), 120)})")
    return words, stuck


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
