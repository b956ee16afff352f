"""The sync engine: push the outbound queue, pull the peer's, apply.

Database work happens in short transactions of its own; HTTP happens
between them, never inside one.  A message is marked delivered only after
the peer answered 2xx, so a lost reply means a re-send, which the peer
stores once (``queues.store_inbound``).
"""
from __future__ import annotations

import dataclasses
import logging
import time

import transaction
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from zope.sqlalchemy import register

from . import queues, wire
from .client import BodyTooLarge, Client, PeerError
from .inbox import ApplyResult, apply_pending
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

    def __str__(self) -> str:
        return (f'pushed={self.pushed} pulled={self.pulled} applied={self.applied} '
                f'failed={self.failed} waiting={self.waiting} seconds={self.seconds:.2f}')

    def __iadd__(self, other: Summary) -> Summary:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))
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
                  retry_now: bool = False) -> ApplyResult:
    """Apply pending inbound messages with a session and transaction
    manager of their own (as the server does after a request commits).
    ``retry_now`` retries failed messages without ``retry_delay``."""
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(bind, tm)
    try:
        result = apply_pending(session, tm, settings.name, settings.batch_size, ids,
                               0 if retry_now else settings.retry_delay)
        if ids is None:  # the server's normal run: keep history bounded
            purge_if_due(session, tm, settings.retention_days)
        return result
    finally:
        session.close()


class MessageTooLarge(PeerError):
    """One outbound message is larger than the peer accepts.  It holds up
    the push (a later message may update the same record) but not the pull."""


class Communicator:
    """Push, pull and apply for the app whose database is ``bind``."""

    def __init__(self, settings: CommunicatorSettings, bind: Engine,
                 client: Client | None = None,
                 tm: transaction.TransactionManager | None = None,
                 progress: Progress = NO_PROGRESS) -> None:
        self.settings = settings
        self.bind = bind
        self.client = client or Client(settings)
        self.tm = tm or transaction.TransactionManager(explicit=True)
        self.session = make_session(bind, self.tm)
        self.progress = progress

    def close(self) -> None:
        self.session.close()
        self.client.close()

    # -- push ----------------------------------------------------------------

    def push(self) -> int:
        """Send undelivered outbound messages until none are left."""
        pushed = after = 0
        total = None
        if self.progress.shown:
            with self.tm:
                total = queues.count_pending_outbound(self.session)
        with self.progress.bar('push', total) as bar:
            while sent := self._push_batch(after):
                count, after = sent
                pushed += count
                bar.update(count)
        if pushed == 0:
            self.client.push(b'[]')  # still an exchange: the peer retries its failures
            with self.tm:
                queues.set_state(self.session, 'last_push_at')
        return pushed

    def _push_batch(self, after: int) -> tuple[int, int] | None:
        """Send the batch after id ``after``: how many went, and the last
        id; None when nothing is left."""
        with self.tm:
            rows = queues.within_bytes(
                queues.pending_outbound(self.session, self.settings.batch_size, after),
                self.settings.batch_bytes)
        if not rows:
            return None
        messages = [wire.outbound_to_wire(row, self.settings.name) for row in rows]
        self._send(messages)
        with self.tm:
            queues.mark_delivered(self.session, [m.id for m in messages])
            queues.set_state(self.session, 'last_push_at')
        log.info('pushed %d messages (up to id %d)', len(messages), rows[-1].id)
        return len(messages), rows[-1].id

    def _send(self, messages: list[wire.WireMessage]) -> None:
        """POST messages, in halves when they exceed the body size limit."""
        payload = wire.dumps(messages)
        too_large = len(payload) > self.settings.max_body_bytes
        if not too_large:
            try:
                self.client.push(payload)
                return
            except BodyTooLarge:
                too_large = True
        if len(messages) == 1:
            raise MessageTooLarge(
                f'outbound message {messages[0].id} is {len(payload)} bytes encoded, '
                'more than the peer accepts (communicator.max_body_bytes)')
        half = len(messages) // 2
        self._send(messages[:half])
        self._send(messages[half:])

    # -- pull ----------------------------------------------------------------

    def pull(self) -> int:
        """Fetch the peer's pending messages and store them, batch by batch."""
        pulled = 0
        sender = self.client.base_uri
        previous: list[int] = []
        total = self._peer_pending() if self.progress.shown else None
        with self.progress.bar('pull', total) as bar:
            while True:
                with self.tm:
                    from_id = queues.last_remote_id(self.session, sender) + 1
                reply = self.client.pull(from_id)
                sender = reply.sender
                ids = [m.id for m in reply.messages]
                if ids and ids == previous:
                    raise PeerError(f'{self.client.messages_url} serves the same messages '
                                    'again after they were acknowledged')
                previous = ids
                if reply.messages:
                    with self.tm:
                        queues.store_inbound(self.session, sender, reply.messages)
                    if reply.acknowledges:
                        self.client.acknowledge([m.id for m in reply.messages])
                    pulled += len(reply.messages)
                    bar.update(len(reply.messages))
                    log.info('pulled %d messages from %s', len(reply.messages), sender)
                # Our server says when more wait; the gem's serves all at once
                # and the cursor moves on until a reply is empty.
                if not reply.messages or (reply.acknowledges and not reply.more):
                    break
        with self.tm:
            queues.set_state(self.session, 'last_pull_at', sender)
        return pulled

    def _peer_pending(self) -> int | None:
        """The peer's outbound queue depth, for the pull's progress: known
        from its status route, unknown without one (the gem)."""
        try:
            status = self.client.status()
        except PeerError:
            return None  # the pull itself says what is wrong
        return None if status is None else status['outbound'].get('pending')

    # -- apply ---------------------------------------------------------------

    def apply(self) -> ApplyResult:
        total = None
        if self.progress.shown:
            with self.tm:
                total = queues.count_pending_inbound(self.session)
        with self.progress.bar('apply', total) as bar:
            return apply_pending(self.session, self.tm, self.settings.name,
                                 self.settings.batch_size,
                                 retry_delay=self.settings.retry_delay, progress=bar.update)

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
        summary = Summary()
        held_up = None
        if push:
            try:
                summary.pushed = self.push()
            except MessageTooLarge as exc:
                held_up = exc  # the peer is fine: still pull and apply
        if pull:
            summary.pulled = self.pull()
        result = self.apply()
        if result.waiting_upgrade:  # cron mails it: someone must upgrade this app
            log.warning('%d inbound messages are of a newer format than this version '
                        'knows; they wait for an upgrade', result.waiting_upgrade)
        purge_if_due(self.session, self.tm, self.settings.retention_days)
        if held_up is not None:
            raise held_up
        summary.applied, summary.failed, summary.waiting = (
            result.applied, result.failed, result.waiting)
        summary.seconds = time.monotonic() - started
        return summary
