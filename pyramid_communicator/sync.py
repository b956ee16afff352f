"""The sync engine: push the outbound queue, pull the peer's, apply.

Database work happens in short transactions of its own; HTTP happens
between them, never inside one.  A message is marked delivered only after
the peer answered 2xx, so a lost reply means a re-send, which the peer
stores once (``queues.store_inbound``).

The wire and the database overlap: while one batch is on its way (a push
waits for the peer to apply it, a pull for the peer to serve the next),
a thread of its own carries the HTTP request and this one reads and
encodes the next batch to push and marks the one before delivered, or
applies the batch just pulled while its acknowledgement and the request
for the next one go out.  Only one request is in flight at a time, so
the peer sees batches in order.
"""
from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import transaction
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from zope.sqlalchemy import register

from . import echoes, outbound_failures, queues, restores, wire
from .client import BodyTooLarge, Client, PeerError, PullReply, RequestRefused
from .inbox import ApplyResult, apply_pending
from .models import utcnow
from .progress import NO_PROGRESS, Progress
from .records import APPLYING
from .retention import purge_if_due
from .settings import CommunicatorSettings

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Summary:
    pushed: int = 0
    pulled: int = 0
    applied: int = 0
    failed: int = 0
    waiting: int = 0
    seconds: float = 0.0
    #: The run stopped at ``communicator.run_seconds`` with work left for
    #: the next one (not a failure).
    stopped_early: bool = False
    #: Outbound messages the peer refused for good in this run, now set
    #: aside (:mod:`.outbound_failures`); shown only when there are any.
    set_aside: int = 0
    #: A checkpoint differed (a restore): what this side healed.
    healed: str | None = None

    def __str__(self) -> str:
        return (f'pushed={self.pushed} pulled={self.pulled} applied={self.applied} '
                f'failed={self.failed} waiting={self.waiting} seconds={self.seconds:.2f}'
                + (f' set_aside={self.set_aside}' if self.set_aside else '')
                + (' stopped_early=1' if self.stopped_early else ''))

    def __iadd__(self, other: Summary) -> Summary:
        for field in dataclasses.fields(self):
            if field.name == 'stopped_early':
                self.stopped_early = self.stopped_early or other.stopped_early
            elif field.name == 'healed':
                self.healed = self.healed or other.healed
            else:
                setattr(self, field.name,
                        getattr(self, field.name) + getattr(other, field.name))
        return self


def make_session(bind: Engine, tm: transaction.TransactionManager) -> Session:
    """A session of our own on the host's database, joined to ``tm``.

    Changes made through it are applied messages, so autopublish leaves
    them alone (no echo back to the sender).
    """
    if bind.dialect.name in ('mysql', 'mariadb'):
        # InnoDB's REPEATABLE READ takes gap locks on the index ranges a
        # batch reads FOR UPDATE, which would block (and deadlock with) the
        # host's inserts; READ COMMITTED locks the rows found, as PostgreSQL.
        bind = bind.execution_options(isolation_level='READ COMMITTED')
    session = Session(bind=bind, info={APPLYING: True})
    register(session, transaction_manager=tm)
    return session


def apply_inbound(bind: Engine, settings: CommunicatorSettings, ids=None,
                  retry_now: bool = False,
                  known: Mapping[tuple[str, int], wire.WireMessage] | None = None,
                  stop: Callable[[], bool] | None = None,
                  registry: Any = None) -> ApplyResult:
    """Apply pending inbound messages with a session and transaction
    manager of their own (as the server does after a request commits).
    ``retry_now`` retries all failed messages (or those of ``ids``) at
    once, without back-off or ``retry_limit``; ``known``: see
    :func:`.inbox.apply_pending`.  ``stop`` (the server's budget, see
    ``communicator.apply_seconds``) ends the apply between pages and the
    purge between its pages; each does one page at least, and the next
    call goes on.  ``registry``: the app's, where plain messages find their
    handlers (the server's ``request.registry``, ``pcommunicate``'s
    bootstrapped one)."""
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(bind, tm)
    try:
        result = apply_pending(session, tm, settings.name, settings.batch_size, ids,
                               0 if retry_now else settings.retry_delay, known=known,
                               gem_peer=settings.gem_peer,
                               retry_max_delay=settings.retry_max_delay,
                               retry_limit=None if retry_now else settings.retry_limit,
                               stop=stop, registry=registry)
        if ids is None:  # the server's normal run: keep history bounded
            purge_if_due(session, tm, settings.retention_days, stop=stop)
        return result
    finally:
        session.close()


class Communicator:
    """Push, pull and apply for the app whose database is ``bind``."""

    def __init__(self, settings: CommunicatorSettings, bind: Engine,
                 client: Client | None = None,
                 tm: transaction.TransactionManager | None = None,
                 progress: Progress = NO_PROGRESS, registry: Any = None) -> None:
        self.settings = settings
        #: The app's Pyramid registry: plain messages' handlers (None: such
        #: messages fail, to be retried by a run that has it).
        self.registry = registry
        self.bind = bind
        self.client = client or Client(settings)
        self.tm = tm or transaction.TransactionManager(explicit=True)
        self.session = make_session(bind, self.tm)
        self.progress = progress
        #: When this run pushes and pulls no further batch
        #: (``communicator.run_seconds``; None: no limit), and whether it
        #: stopped so, with work left.
        self.ends_at: float | None = None
        self.stopped_early = False
        #: Records whose messages wait behind a set-aside one: read when a
        #: push starts, grown by the wire thread as it sets messages aside
        #: (the main thread only asks it, to leave them out of batches).
        self.held: set[outbound_failures.Identity] = set()
        #: Messages set aside by this run's pushes.
        self.set_aside = 0
        #: What the last checkpoint healed (None: nothing differed).
        self.healing: restores.Healing | None = None

    def _out_of_time(self, what: str, left: bool = True) -> bool:
        """Past ``run_seconds``?  Then say so once: a run that stops with
        work left is not a failure, but an operator should see it happen."""
        if self.ends_at is None or time.monotonic() < self.ends_at:
            return False
        if left:
            log.warning('%s stopped after communicator.run_seconds=%d with work left; '
                        'the next run goes on', what, self.settings.run_seconds)
            self.stopped_early = True
        return True

    def close(self) -> None:
        self.session.close()
        self.client.close()

    # -- push ----------------------------------------------------------------

    def push(self) -> int:
        """Send undelivered outbound messages until none are left; those
        the peer refuses for good are set aside, and the later messages of
        their records wait (:mod:`.outbound_failures`)."""
        pushed = 0
        total = None
        with self.tm:
            self.held = outbound_failures.held_identities(self.session, self.settings.name)
            if self.progress.shown:
                total = queues.count_pending_outbound(self.session)
        with self.progress.bar('push', total) as bar, _wire_thread('push') as wire_thread:
            batch = self._next_batch(0)
            sending = self._submit(wire_thread, batch)
            while batch is not None:
                following = self._next_batch(batch.messages[-1].id)  # meanwhile
                if following is not None and self._out_of_time('push'):
                    following = None  # this batch is the run's last
                sent: _Sent = sending.result()
                # The next batch goes while this one is marked delivered: a
                # run stopped in between sends both again, which the peer
                # stores once.
                sending = self._submit(wire_thread, following)
                with self.tm:
                    queues.mark_delivered(self.session, sent.delivered)
                    outbound_failures.record(self.session, sent.set_aside)
                    queues.set_state(self.session, 'last_push_at', self.client.push_peer)
                for item in sent.set_aside:  # cron mails it: someone must decide
                    log.warning('set aside outbound message %d: %s; the later messages of '
                                'its record wait (pcommunicate --status lists it, '
                                '--retry-outbound or --give-up-outbound settle it)',
                                item.message_id, item.reason)
                if sent.delivered:
                    log.info('pushed %d messages (up to id %d)', len(sent.delivered),
                             max(sent.delivered))
                pushed += len(sent.delivered)
                self.set_aside += len(sent.set_aside)
                bar.update(len(batch.messages))
                batch = following
        if pushed == 0:
            self.client.push(b'[]')  # still an exchange: the peer retries its failures
            with self.tm:
                queues.set_state(self.session, 'last_push_at', self.client.push_peer)
        return pushed

    def _submit(self, wire_thread: ThreadPoolExecutor, batch: _Batch | None) -> Future | None:
        if batch is None:
            return None
        return wire_thread.submit(self._send, batch.messages, batch.payload)

    def _next_batch(self, after: int) -> _Batch | None:
        """The batch after id ``after``, encoded, without the messages that
        wait behind a set-aside one; None when nothing is left."""
        with self.tm:
            while True:
                rows = queues.pending_outbound(self.session, self.settings.batch_size, after)
                if not rows:
                    return None
                kept = [row for row in rows if not self._held_back(
                    row.body, row.origin, row.original_id)]
                if kept:
                    break
                after = rows[-1].id  # a page of held-back messages only: read on
            # A gem peer needs no signature: it never echoes (.echoes).
            key = None if self.settings.gem_peer else echoes.signing_key(self.session)
        rows = queues.within_bytes(kept, self.settings.batch_bytes)
        messages = [wire.outbound_to_wire(row, self.settings.name, key) for row in rows]
        # Unchanged unless the wire thread sets a message aside meanwhile.
        return _Batch(messages, wire.dumps(messages))

    def _held_back(self, body: str, origin: str | None, original_id: int | None) -> bool:
        if not self.held or original_id is None:
            return False
        return outbound_failures.identity(body, origin, original_id,
                                          self.settings.name) in self.held

    def _send(self, messages: list[wire.WireMessage], payload: bytes | None = None) -> _Sent:
        """POST messages (``payload``: encoded already); what the peer
        refuses for good is found by halves and set aside."""
        sent = _Sent()
        self._send_part(messages, payload, sent)
        return sent

    def _send_part(self, messages: list[wire.WireMessage], payload: bytes | None,
                   sent: _Sent) -> None:
        kept = [m for m in messages if not self._held_back(m.body, m.origin, m.original_id)]
        if not kept:
            return
        if payload is None or len(kept) < len(messages):
            payload = wire.dumps(kept)
        reason = None
        if len(payload) > self.settings.max_body_bytes:
            reason = (f'{len(payload)} bytes encoded, more than '
                      f'communicator.max_body_bytes={self.settings.max_body_bytes} '
                      'lets one push carry')
        else:
            try:
                self.client.push(payload)
                sent.delivered.extend(m.id for m in kept)
                return
            except BodyTooLarge:
                reason = (f'{len(payload)} bytes encoded, more than the peer accepts '
                          '(its communicator.max_body_bytes)')
            except RequestRefused as exc:
                if not outbound_failures.refused_for_good(exc.status):
                    raise
                reason = f'refused by the peer: {exc}'
                if len(kept) == 1:
                    # The peer takes an empty push, so it is this message
                    # it refuses, not every request (a wrong URL, a peer
                    # configured with our name): those fail the run here.
                    self.client.push(b'[]')
        if len(kept) == 1:
            message = kept[0]
            sent.set_aside.append(outbound_failures.SetAside(message.id, reason))
            key = outbound_failures.identity(message.body, message.origin,
                                             message.original_id, self.settings.name)
            if key is not None:
                self.held.add(key)
            return
        half = len(kept) // 2
        self._send_part(kept[:half], None, sent)
        self._send_part(kept[half:], None, sent)

    # -- checkpoint ------------------------------------------------------------

    def checkpoint(self) -> restores.Healing | None:
        """Compare checkpoints with the peer before anything moves; if
        either database was restored, heal (:mod:`.restores`).  The HTTP
        request goes between our two transactions, never inside one."""
        with self.tm:
            headers, proposed = restores.request_headers(self.session)
        answer = self.client.checkpoint(headers)
        if answer is None:
            return None
        reply, peer = answer
        try:
            with self.tm:
                self.healing = restores.conclude(self.session, self.settings.name, peer,
                                                 proposed, reply)
        except wire.WireError as exc:
            raise PeerError(f'{self.client.messages_url} sent an invalid checkpoint: '
                            f'{exc}') from None
        return self.healing

    # -- pull ----------------------------------------------------------------

    def pull(self, applied: ApplyResult | None = None) -> int:
        """Fetch the peer's pending messages and store them, batch by batch.

        With ``applied``, each batch stored is also applied while the next
        one is fetched, and the outcome added to ``applied``; failures of
        earlier runs are left to :meth:`apply`, which follows."""
        pulled = 0
        sender = self.client.base_uri
        previous: list[int] = []
        total = self._peer_pending() if self.progress.shown else None
        with self.progress.bar('pull', total) as bar, _wire_thread('pull') as wire_thread:
            fetching = None
            while True:
                if fetching is None:
                    with self.tm:
                        from_id = queues.last_remote_id(self.session, sender) + 1
                    reply = self.client.pull(from_id)
                else:
                    reply = fetching.result()
                    fetching = None
                sender = reply.sender
                ids = [m.id for m in reply.messages]
                if ids and ids == previous:
                    raise PeerError(f'{self.client.messages_url} serves the same messages '
                                    'again after they were acknowledged')
                previous = ids
                _log_malformed(reply.messages, sender)
                stored: list[wire.WireMessage] = []
                if reply.messages:
                    with self.tm:
                        stored = queues.store_inbound(self.session, sender, reply.messages)
                    pulled += len(reply.messages)
                    bar.update(len(reply.messages))
                    log.info('pulled %d messages from %s', len(reply.messages), sender)
                # Our server says when more wait; the gem's serves all at once
                # and the cursor moves on until a reply is empty.
                if not reply.messages or (reply.acknowledges and not reply.more):
                    if reply.messages and reply.acknowledges:
                        self.client.acknowledge(ids)
                    break
                if self._out_of_time('pull'):
                    if reply.acknowledges:
                        self.client.acknowledge(ids)
                    break
                if reply.acknowledges:
                    # Stored: the acknowledgement, then the next batch (our
                    # server serves what is not acknowledged, from_id aside),
                    # go on their way while this one is applied.
                    fetching = wire_thread.submit(self._acknowledge_and_pull, ids)
                if applied is not None:
                    # No failure is retried here, and what waits is counted,
                    # by the apply that follows the pull.
                    # What waits for a record of a later page waits for it.
                    result = self._apply(not_retried_since=datetime.datetime.min,
                                         known={(sender, m.id): m for m in stored},
                                         keep_waiting=True)
                    applied.applied += result.applied
                    applied.failed += result.failed
        with self.tm:
            queues.set_state(self.session, 'last_pull_at', sender)
        return pulled

    def _acknowledge_and_pull(self, ids: list[int]) -> PullReply:
        self.client.acknowledge(ids)
        return self.client.pull(max(ids) + 1)

    def _peer_pending(self) -> int | None:
        """The peer's outbound queue depth, for the pull's progress: known
        from its status route, unknown without one (the gem)."""
        try:
            status = self.client.status()
        except PeerError:
            return None  # the pull itself says what is wrong
        pending = None if status is None else status['outbound'].get('pending')
        # Only shown, but a peer may send anything: a count or nothing.
        if isinstance(pending, int) and not isinstance(pending, bool) and pending >= 0:
            return pending
        return None

    # -- apply ---------------------------------------------------------------

    def apply(self, not_retried_since: datetime.datetime | None = None,
              applied_before: int = 0) -> ApplyResult:
        """Apply what is pending; a message that failed after
        ``not_retried_since`` (in this run) waits for the next run.
        ``applied_before`` (applied while pulling) counts in the progress."""
        total = None
        if self.progress.shown:
            with self.tm:
                total = queues.count_pending_inbound(self.session) + applied_before
        with self.progress.bar('apply', total) as bar:
            bar.update(applied_before)
            return self._apply(not_retried_since, bar.update)

    def _apply(self, not_retried_since: datetime.datetime | None = None,
               progress=None,
               known: Mapping[tuple[str, int], wire.WireMessage] | None = None,
               keep_waiting: bool = False) -> ApplyResult:
        return apply_pending(self.session, self.tm, self.settings.name,
                             self.settings.batch_size, retry_delay=self.settings.retry_delay,
                             progress=progress, not_retried_since=not_retried_since,
                             known=known, gem_peer=self.settings.gem_peer,
                             retry_max_delay=self.settings.retry_max_delay,
                             retry_limit=self.settings.retry_limit,
                             stop=lambda: self._out_of_time('apply'),
                             registry=self.registry, keep_waiting=keep_waiting)

    def communicate(self, push: bool = True, pull: bool = True) -> Summary:
        """Push, pull, apply; raises :class:`PeerError` if the exchange
        failed.  The outcome is kept for ``--status`` (``last_run``)."""
        try:
            summary = self._communicate(push, pull)
        except PeerError as exc:
            try:
                self._record_run(f'failed: {exc}')
            except Exception:  # the exchange's error is the one to report
                log.debug('could not record the failed run', exc_info=True)
            raise
        self._record_run(f'ok: {summary}')
        return summary

    def _record_run(self, result: str) -> None:
        with self.tm:
            queues.set_state(self.session, queues.LAST_RUN_KEY, result[:255])

    def _communicate(self, push: bool, pull: bool) -> Summary:
        started = time.monotonic()
        if self.settings.run_seconds:
            self.ends_at = started + self.settings.run_seconds
        self.stopped_early = False
        summary = Summary()
        self.set_aside = 0
        if (push or pull) and self.checkpoint() is not None:
            summary.healed = str(self.healing)
        if push:
            summary.pushed = self.push()
        result = ApplyResult()
        run_started = utcnow()
        if pull:
            summary.pulled = self.pull(applied=result)
        result += self.apply(not_retried_since=run_started, applied_before=result.applied)
        if result.waiting_upgrade:  # cron mails it: someone must upgrade this app
            log.warning('%d inbound messages are of a newer format than this version '
                        'knows; they wait for an upgrade', result.waiting_upgrade)
        purge_if_due(self.session, self.tm, self.settings.retention_days)
        summary.applied, summary.failed, summary.waiting = (
            result.applied, result.failed, result.waiting)
        summary.seconds = time.monotonic() - started
        summary.stopped_early = self.stopped_early
        summary.set_aside = self.set_aside
        return summary


@dataclasses.dataclass
class _Batch:
    messages: list[wire.WireMessage]
    payload: bytes


@dataclasses.dataclass
class _Sent:
    """What became of a batch: the ids the peer took, the messages it
    refused for good; the rest (held back behind those) stays pending."""
    delivered: list[int] = dataclasses.field(default_factory=list)
    set_aside: list[outbound_failures.SetAside] = dataclasses.field(default_factory=list)


def _wire_thread(name: str) -> ThreadPoolExecutor:
    """The one thread that carries a run's HTTP requests while this one
    works on the database."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix=f'communicator-{name}')


def _log_malformed(messages: list[wire.WireMessage], sender: str) -> None:
    """Say what of a pulled reply is refused (stored so, acknowledged) or
    skipped (no usable id: neither stored nor acknowledged)."""
    refused = sum(1 for m in messages if m.error is not None)
    skipped = getattr(messages, 'skipped', 0)
    if refused or skipped:
        log.warning('refused %d malformed messages from %s and skipped %d without a '
                    'usable id', refused, sender, skipped)
