"""Applying stored inbound messages, a batch per transaction.

A batch is applied optimistically in one transaction, reading and
writing records and their metadata set-wise (:mod:`.working_set`).  If any message of
it fails, the transaction rolls back and the batch is split in halves,
each tried on its own, down to the single message that fails: that one is
kept with its error (or as refused), the others are applied.  This needs
no savepoints (which zope.sqlalchemy turns off on SQLite) and costs a few
extra transactions only when something fails.

The batch's messages are claimed by a conditional UPDATE in its
transaction (``queues.claim_batch``), so several workers or runs can
apply the same queue at once without applying anything twice.  A message
that fails is retried on later runs, less often the longer it fails and
a bounded number per run (:mod:`.retries`), in batches apart from new
messages; later messages for the same record wait behind it so that
updates are never applied out of order, while other records go on.

A message of a newer format than this version knows
(:data:`.wire.FORMAT_VERSION`) is neither applied nor failed: it stays
pending, counted as waiting for an upgrade, and holds back later messages
for its record like a failure does, until a run of the upgraded version
applies them in order.  (A record is recognised by the name in the body,
which a future format may not let us read; such a message holds back
nothing but itself.)

A message whose foreign key names a record that is neither here nor in
its batch (a child sent before its parent, a batch apart) is not failed
at once: it is set aside, with the later messages of its record, and
tried again once the rest of the run is applied, in passes while a pass
applies something (:mod:`.dependencies` orders each batch), so that a
tree or a cycle of records arrives in one run whatever the order of its
messages.  What still cannot be applied is failed as before.  At most
:data:`MAX_PASSES` passes and ``100 * batch_size`` messages set aside
per call keep the work and the memory of a run bounded.

Plain messages (:mod:`.messages`) go through the same batches, in id
order among the records: the records before one are written, then its
handler runs, in the same transaction.  Those sent with an ordering key
wait behind a failed one of the same sender, kind and key, as records
wait behind a failed message of their record.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import transaction
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from . import echoes, queues, wire
from .applying import Message, Refused, apply_message
from .dependencies import Unresolved, arrange
from .links import LINK, LinkBatch, apply_link
from .message_bodies import PLAIN, check_fields, ordering_key
from .messages import dispatch, handler_for
from .models import utcnow
from .records import decode_body
from .retries import DEFAULT_MAX_DELAY, Backoff, RetryPlan, plan_retries
from .wire import WireMessage
from .working_set import WorkingSet

log = logging.getLogger(__name__)

#: Passes over the messages set aside for a record not here yet: a tree
#: of about this many levels sent children first arrives in one run.
MAX_PASSES = 16


@dataclasses.dataclass
class _SetAside:
    """Messages waiting for a record later in the run (by id), and their
    records (later messages of those wait with them, in order)."""
    limit: int
    ids: list[int] = dataclasses.field(default_factory=list)
    keys: set[tuple] = dataclasses.field(default_factory=set)

    def take(self, items: list[tuple]) -> list[tuple]:
        """Set ``items`` aside as far as the limit allows; the rest."""
        rest = []
        for item in items:
            row, key = item
            if len(self.ids) >= self.limit:
                rest.append(item)
                continue
            self.ids.append(row.id)
            if key is not None:
                self.keys.add(key)
        return rest


@dataclasses.dataclass
class ApplyResult:
    applied: int = 0
    failed: int = 0
    #: Held back this run: behind a failure of the same record, a failure
    #: not due for its retry (or over the retry limit), or waiting for an
    #: upgrade.
    waiting: int = 0
    #: Of ``waiting``: messages of a newer format than this version knows.
    waiting_upgrade: int = 0
    #: Messages that had failed before and were tried again (of them,
    #: ``retried_failed`` failed again; both also count in ``applied`` or
    #: ``failed``).
    retried: int = 0
    retried_failed: int = 0
    #: Failed messages due for a retry but left for a later call by
    #: ``retry_limit`` (they count in ``waiting``).
    retries_deferred: int = 0

    def __iadd__(self, other: ApplyResult) -> ApplyResult:
        self.applied += other.applied
        self.failed += other.failed
        self.waiting += other.waiting
        self.waiting_upgrade += other.waiting_upgrade
        self.retried += other.retried
        self.retried_failed += other.retried_failed
        self.retries_deferred += other.retries_deferred
        return self


def _decoded(row, arrived: WireMessage | None) -> tuple[str, dict] | None:
    if arrived is not None and arrived.decoded is not None:
        return arrived.decoded
    try:
        return decode_body(row.body)
    except ValueError:
        return None  # fails on its own when applied


def _arrived(row, known: Mapping[tuple[str, int], WireMessage] | None) -> WireMessage | None:
    """The message as it arrived in this process, if it did and it is
    the one stored (a sender could re-send an id with another body, which
    the queue did not store)."""
    if not known:
        return None
    arrived = known.get((row.sender, row.remote_id))
    return arrived if arrived is not None and arrived.body == row.body else None


def _key_of(row, decoded: tuple[str, dict] | None, local_name: str) -> tuple | None:
    if decoded is not None and decoded[0] == PLAIN:
        return ordering_key(row.sender, decoded[1])
    if row.original_id is None or decoded is None:
        return None  # a record without identity is always a record of its own
    return decoded[0], row.origin or local_name, row.original_id


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
                  retry_delay: float = 0,
                  progress: Callable[[int], None] | None = None,
                  not_retried_since: datetime.datetime | None = None,
                  known: Mapping[tuple[str, int], WireMessage] | None = None,
                  gem_peer: bool = False,
                  retry_max_delay: float = DEFAULT_MAX_DELAY,
                  retry_limit: int | None = None,
                  stop: Callable[[], bool] | None = None,
                  registry: Any = None,
                  keep_waiting: bool = False) -> ApplyResult:
    """Apply pending inbound messages in id order, in batches.

    A message that failed is tried again once ``retry_delay * 2 **
    (attempts - 1)`` seconds (at most ``retry_max_delay``) have passed
    since it last failed, and by at most ``retry_limit`` (None: no limit)
    per call, the longest overdue first (see :mod:`.retries`): a server
    applies on every request of a run, and a pile of hopeless messages
    must not cost each of them in proportion to its size.  One not tried
    still holds back later messages for its record.  Nor is one that
    failed after ``not_retried_since`` tried (a run that applies as it
    pulls tries each message once; ``datetime.min``: no failure is
    retried).  The failures tried again go in batches of their own,
    ahead of the page's new messages, so that a new batch is not split
    in halves for an old failure.

    ``session`` must be registered with ``tm`` (zope.sqlalchemy) and must
    not be the session of a request in progress: every batch is committed
    or rolled back on its own.  ``progress`` is told how many messages each
    batch went through (applied, failed or left waiting).  ``known``:
    messages this process just received and stored, by (sender, remote
    id), parsed already (the stored rows stay what is applied).
    ``stop``: asked after each page; True ends the call with the rest
    left pending (``communicator.run_seconds``).
    ``gem_peer``: messages without versions are applied (a Rails peer
    running the gem), not refused.  ``registry``: the app's Pyramid
    registry, where plain messages find their handlers; without it they
    fail (and are retried by a caller that passes it), never refused.
    ``keep_waiting``: messages still waiting for a record at the end are
    left pending, neither failed nor counted, for a later call of the same
    run (the pull applies each page it stores while more are coming; the
    apply that ends the run settles them).
    """
    result = ApplyResult()
    blocked: set[tuple] = set()
    retrying = _plan_retries(session, tm, Backoff(retry_delay, retry_max_delay),
                             not_retried_since, ids, retry_limit)
    result.retries_deferred = retrying.deferred
    aside = _SetAside(limit=batch_size * 100)

    def apply_rows(rows: list, aside: _SetAside | None) -> None:
        """Apply a page of pending rows (in id order): failures due for a
        retry first, in a batch of their own, then the rest."""
        decoded: dict[int, tuple[str, dict] | None] = {}
        arrived: dict[int, WireMessage] = {}
        ready, retries = [], []
        fresh_keys: set[tuple] = set()
        for row in rows:
            message = _arrived(row, known)
            if message is not None:
                arrived[row.id] = message
            decoded[row.id] = _decoded(row, message)  # once, also if split and retried
            key = _key_of(row, decoded[row.id], local_name)
            if row.format > wire.FORMAT_VERSION:
                result.waiting += 1
                result.waiting_upgrade += 1
                if key is not None:
                    blocked.add(key)
            elif key is not None and key in blocked:
                result.waiting += 1
            elif aside is not None and key is not None and key in aside.keys:
                result.waiting += len(aside.take([(row, key)]))  # behind one set aside
            elif row.failed_at is not None and row.id not in retrying.chosen:
                result.waiting += 1  # not due yet, or over this call's limit
                if key is not None:
                    blocked.add(key)
            elif row.failed_at is not None and (key is None or key not in fresh_keys):
                retries.append((row, key))
            else:  # new (or a retry behind a new message of its record: in order)
                ready.append((row, key))
                if key is not None:
                    fresh_keys.add(key)
        if retries:
            applied, failed = result.applied, result.failed
            _apply_batch(session, tm, local_name, retries, blocked, result, decoded, arrived,
                         halves=False, gem_peer=gem_peer, registry=registry, aside=aside)
            result.retried += result.applied - applied + result.failed - failed
            result.retried_failed += result.failed - failed
        _apply_batch(session, tm, local_name, ready, blocked, result, decoded, arrived,
                     gem_peer=gem_peer, registry=registry, aside=aside)

    after = 0
    while True:
        with tm:
            rows = queues.pending_inbound(session, batch_size, after, ids)
        if rows:
            after = rows[-1].id
        apply_rows(rows, aside)
        if progress is not None and rows:
            progress(len(rows))
        if len(rows) < batch_size:
            break
        if stop is not None and stop():
            return result  # the rest stays pending, for the next run
    # What waited for records later in the run, again, while that helps;
    # the last pass keeps what still cannot be applied as failed.
    progressed, passes = result.applied > 0, 0
    while aside.ids:
        passes += 1
        last = not progressed or passes >= MAX_PASSES
        if last and keep_waiting:
            break  # pending still: more of the run is coming
        waiting, aside = aside.ids, _SetAside(limit=aside.limit)
        before = result.applied
        for start in range(0, len(waiting), batch_size):
            with tm:
                rows = queues.pending_inbound(session, batch_size, 0,
                                              waiting[start:start + batch_size])
            apply_rows(rows, None if last else aside)
        progressed = result.applied > before
        if stop is not None and stop():
            break
    return result


def _plan_retries(session: Session, tm: transaction.TransactionManager, backoff: Backoff,
                  not_retried_since: datetime.datetime | None,
                  ids: Sequence[int] | None, limit: int | None) -> RetryPlan:
    """The failed messages to try again in this call (see :mod:`.retries`)."""
    now = utcnow()
    failed_before = now - datetime.timedelta(seconds=backoff.wait(1))
    if not_retried_since is not None:
        failed_before = min(failed_before, not_retried_since)
    if failed_before == datetime.datetime.min:
        return RetryPlan(frozenset())
    with tm:
        rows = queues.failed_inbound(session, failed_before, ids)
    return plan_retries(rows, backoff, now, limit)


def _message(row, decoded: tuple[str, dict] | None, arrived: WireMessage | None) -> Message:
    if arrived is not None:  # the same JSON, parsed on arrival
        return Message(row.sender, row.body, row.origin, row.original_id,
                       arrived.refs or None, arrived.version or None, row.signature, decoded)
    return Message(row.sender, row.body, row.origin, row.original_id,
                   json.loads(row.refs) if row.refs else None,
                   json.loads(row.version) if row.version else None, row.signature, decoded)


def _apply_batch(session: Session, tm: transaction.TransactionManager, local_name: str,
                 batch: list[tuple], blocked: set[tuple], result: ApplyResult,
                 decoded: dict[int, tuple[str, dict] | None],
                 arrived: dict[int, WireMessage], halves: bool = True,
                 kept: list[tuple[int, Exception]] | None = None,
                 gem_peer: bool = False, registry: Any = None,
                 aside: _SetAside | None = None) -> None:
    """Apply ``batch`` in one transaction, or in halves if that fails.

    ``halves=False``: one by one if that fails, and the failures kept in
    one transaction at the end.  For retries of earlier failures, most of
    which usually fail again, that takes about a third of the
    transactions halving would (n + 2 against 3n - 1 when all fail).
    ``kept``: where a failure goes to be kept later (None: at once).
    ``aside``: where messages waiting for a record not here yet go (None:
    they fail)."""
    ready = [(row, key) for row, key in batch if key is None or key not in blocked]
    result.waiting += len(batch) - len(ready)  # behind a failure found in the other half
    if aside is not None and aside.keys:
        behind = [item for item in ready if item[1] is not None and item[1] in aside.keys]
        ready = [item for item in ready if item[1] is None or item[1] not in aside.keys]
        result.waiting += len(aside.take(behind))
    if not ready:
        return
    try:
        with tm:
            claimed = queues.claim_batch(session, [row.id for row, _ in ready])
            items = [(row, _message(row, decoded.get(row.id), arrived.get(row.id)))
                     for row, _ in ready if row.id in claimed]
            _apply_claimed(session, tm, local_name, items, len(ready) == 1, gem_peer,
                           registry)
            applied = len(items)  # the rest: another worker has them
    except Unresolved as exc:
        # Nothing was written: those waiting for a record not here yet are
        # set aside (or failed), the others go again at once.
        waiting = [item for item in ready if item[0].id in exc.reasons]
        failing = waiting if aside is None else aside.take(waiting)
        failures = kept if kept is not None else []
        for item in failing:
            _fail(session, tm, item, LookupError(exc.reasons[item[0].id]), blocked, result,
                  failures)
        if kept is None:
            _keep_failures(session, tm, failures)  # one transaction for them all
        rest = [item for item in ready if item[0].id not in exc.reasons]
        _apply_batch(session, tm, local_name, rest, blocked, result, decoded, arrived,
                     halves, kept, gem_peer, registry, aside)
        return
    except Exception as exc:
        culprit = getattr(exc, 'communicator_inbound_id', None)
        if len(ready) > 1 and culprit is not None:
            # A handler failed: it alone is kept, the rest goes again at once.
            failed = [item for item in ready if item[0].id == culprit]
            if failed:
                _fail(session, tm, failed[0], exc, blocked, result, kept)
                _apply_batch(session, tm, local_name,
                             [item for item in ready if item[0].id != culprit], blocked,
                             result, decoded, arrived, halves, kept, gem_peer, registry,
                             aside)
                return
        if len(ready) > 1 and not halves:
            failures: list[tuple[int, Exception]] = []
            for item in ready:
                _apply_batch(session, tm, local_name, [item], blocked, result, decoded,
                             arrived, kept=failures, gem_peer=gem_peer, registry=registry,
                             aside=aside)
            _keep_failures(session, tm, failures)
            return
        if len(ready) > 1:
            half = len(ready) // 2
            _apply_batch(session, tm, local_name, ready[:half], blocked, result, decoded,
                         arrived, gem_peer=gem_peer, registry=registry, aside=aside)
            _apply_batch(session, tm, local_name, ready[half:], blocked, result, decoded,
                         arrived, gem_peer=gem_peer, registry=registry, aside=aside)
            return
        _fail(session, tm, ready[0], exc, blocked, result, kept)
    else:
        result.applied += applied


def _fail(session: Session, tm: transaction.TransactionManager, item: tuple,
          exc: Exception, blocked: set[tuple], result: ApplyResult,
          kept: list[tuple[int, Exception]] | None) -> None:
    """Keep one message's failure (now, or in ``kept``); a failure (not a
    refusal) holds back the later messages of its key."""
    row, key = item
    if kept is None:
        _keep_failures(session, tm, [(row.id, exc)])
    else:
        kept.append((row.id, exc))
    result.failed += 1
    if key is not None and not isinstance(exc, Refused):
        blocked.add(key)


def _apply_claimed(session: Session, tm: transaction.TransactionManager,
                   local_name: str, items: list[tuple],
                   alone: bool, gem_peer: bool, registry: Any) -> None:
    """Apply claimed messages in order, in the caller's transaction: each
    run of records through a working set of its own, written before the
    plain message after it is handed to its handler (which may read them)."""
    records: list[tuple[int, Message]] = []
    # Refusals first, before any handler runs: a batch that fails for one
    # is tried again without it, and the handlers would run twice.
    found = {}
    for row, message in items:
        if message.decoded is not None and message.decoded[0] == PLAIN:
            try:
                check_fields(message.decoded[1])  # checked on arrival; stored rows again
                found[row.id] = handler_for(registry, row.sender, message.decoded[1])
            except Exception as exc:
                exc.communicator_inbound_id = row.id
                raise
    if found and len(found) < len(items):
        # Records waiting for a record neither here nor in the batch, too
        # (set aside: the batch goes again without them).
        _check_resolved(session, local_name, gem_peer,
                        [(row.id, message) for row, message in items if row.id not in found])

    link_batch: LinkBatch | None = None
    link_fields = [(row.id, message.decoded[1]) for row, message in items
                   if message.decoded is not None and message.decoded[0] == LINK]

    def write_records() -> None:
        if not records:
            return
        if link_batch is not None:
            link_batch.stale = True  # the records may be those its links name
        work = WorkingSet(session, local_name, alone=alone, gem_peer=gem_peer)
        messages = [message for _, message in records]
        work.preload(messages)
        plan = arrange(work, messages)
        if plan.unresolved:
            raise Unresolved({records[position][0]: reason
                              for position, reason in plan.unresolved.items()})
        work.deferrable = {(id(messages[position]), attribute)
                           for position, attribute in plan.deferred}
        with session.no_autoflush:
            for position in plan.order:
                message = messages[position]
                if echoes.is_echo(work, message):
                    echoes.apply_echo(work, message)
                else:
                    apply_message(work, message)
        work.write()
        records.clear()

    for row, message in items:
        if message.decoded is not None and message.decoded[0] == LINK:
            write_records()  # the records it links may be earlier in the batch
            if link_batch is None:
                link_batch = LinkBatch(session, local_name)
            if link_batch.stale:  # the links from here on, a few queries
                link_batch.preload([fields for row_id, fields in link_fields
                                    if row_id >= row.id])
            apply_link(link_batch, row.sender, message.decoded[1])
        elif message.decoded is not None and message.decoded[0] == PLAIN:
            write_records()
            try:
                dispatch(session, registry, found[row.id], row.sender, row.remote_id,
                         message.decoded[1], tm)
            except Exception as exc:
                # Whose failure it is is known: the batch need not be halved
                # (which would call the others' handlers again and again).
                exc.communicator_inbound_id = row.id
                raise
        else:
            records.append((row.id, message))
    write_records()
    if link_batch is not None:
        session.flush()  # the links applied since the last records
        link_batch.write()


def _check_resolved(session: Session, local_name: str, gem_peer: bool,
                    records: list[tuple[int, Message]]) -> None:
    """Raise :class:`.dependencies.Unresolved` for the record messages
    whose foreign keys name a record neither here nor in the batch."""
    work = WorkingSet(session, local_name, gem_peer=gem_peer)
    messages = [message for _, message in records]
    work.preload(messages)
    unresolved = arrange(work, messages).unresolved
    if unresolved:
        raise Unresolved({records[position][0]: reason
                          for position, reason in unresolved.items()})


def _keep_failures(session: Session, tm: transaction.TransactionManager,
                   failures: list[tuple[int, Exception]]) -> None:
    """Keep each message with its error, all in one transaction."""
    if not failures:
        return
    with tm:
        for message_id, exc in failures:
            if isinstance(exc, Refused):
                # The peer may not do this: kept with the reason, never
                # retried by itself, and it holds nothing else back.
                log.warning('inbound message %s refused: %s', message_id, exc)
                queues.record_refusal(session, message_id, f'refused: {exc}')
                continue
            # Log the kind of error only: the text may quote record values.
            log.warning('inbound message %s failed: %s', message_id, type(exc).__name__)
            log.debug('inbound message %s failed', message_id, exc_info=exc)
            queues.record_failure(session, message_id, _describe(exc))
