"""``pcommunicate --drain``: exchange until both sides are empty, before
an upgrade.

Drained means: on both sides nothing pending in either queue, nothing
failed and nothing waiting for an upgrade (refused and given-up messages
are settled and do not count).  Central's side is read from its database,
the facade's from its ``/status.json``; a facade without that route (the
gem) cannot be checked, so it is never reported drained.

Bounded: exchanges go on while they move messages, with short pauses
(doubling up to a few seconds) while nothing moves but something is still
on its way; a failure, or a message waiting for an upgrade, that an
exchange did not clear ends the drain at once, and so does the timeout
(checked between exchanges).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import transaction
from sqlalchemy.engine import Engine

from .client import PeerError
from .locking import run_lock
from .progress import NO_PROGRESS, Progress
from .settings import CommunicatorSettings
from .status import OK, format_peer_status, left_in, peer_name, peer_status, queue_status
from .sync import Communicator, Summary, make_session

#: Pauses between exchanges that moved nothing: from FIRST_PAUSE, doubling
#: up to MAX_PAUSE seconds.
FIRST_PAUSE, MAX_PAUSE = 0.25, 4.0


@dataclasses.dataclass
class DrainResult:
    drained: bool
    #: What is left, per side, in words: ``facade: 3 inbound pending, ...``;
    #: or why the drain could not tell.
    left: list[str]
    summary: Summary
    rounds: int

    def __str__(self) -> str:
        return '; '.join(self.left)


class Drain:
    """Exchange until drained, a failure remains, or ``timeout`` passes."""

    def __init__(self, settings: CommunicatorSettings, bind: Engine, timeout: float,
                 progress: Progress = NO_PROGRESS,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep,
                 registry: Any = None) -> None:
        self.settings = settings
        self.registry = registry  # plain messages' handlers (see .sync.Communicator)
        self.bind = bind
        self.timeout = timeout
        self.progress = progress
        self.clock = clock
        self.sleep = sleep

    def run(self) -> DrainResult:
        deadline = self.clock() + self.timeout
        # A scheduled run still going finishes first (within the timeout).
        with run_lock(self.bind, self.settings.name, self.timeout) as acquired:
            if not acquired:
                return DrainResult(False, [f'another pcommunicate run held the lock for '
                                           f'{self.timeout:g}s'], Summary(), 0)
            communicator = Communicator(self.settings, self.bind, progress=self.progress,
                                        registry=self.registry)
            try:
                return self._rounds(communicator, deadline)
            finally:
                communicator.close()

    def _rounds(self, communicator: Communicator, deadline: float) -> DrainResult:
        total = Summary()
        pause = FIRST_PAUSE
        rounds = 0
        while True:
            rounds += 1
            try:
                summary = communicator.communicate()
            except PeerError as exc:
                left, _ = self._local_left()
                return DrainResult(False, [str(exc), *left], total, rounds)
            total += summary
            left, stuck = self._local_left()
            peer = peer_status(communicator.client)  # no transaction open
            if peer.state != OK:
                return DrainResult(False, [*left, format_peer_status(peer)], total, rounds)
            words, peer_stuck = left_in(peer.status)
            if words:
                left.append(f"{peer_name(peer.status)}: {', '.join(words)}")
            if not left:
                return DrainResult(True, [], total, rounds)
            moved = summary.pushed + summary.pulled + summary.applied
            if not moved and (stuck or peer_stuck):
                return DrainResult(False, ['left after an exchange that cleared nothing',
                                           *left], total, rounds)
            now = self.clock()
            if now >= deadline:
                return DrainResult(False, [f'timeout after {self.timeout:g}s', *left],
                                   total, rounds)
            if moved:
                pause = FIRST_PAUSE
            else:  # on its way (a writer still busy?): wait a little, boundedly
                self.sleep(min(pause, deadline - now))
                pause = min(pause * 2, MAX_PAUSE)

    def _local_left(self) -> tuple[list[str], bool]:
        tm = transaction.TransactionManager(explicit=True)
        session = make_session(self.bind, tm)
        try:
            with tm:
                status = queue_status(session, self.settings.name, conflicts=0)
        finally:
            session.close()
        words, stuck = left_in(status)
        return ([f"{self.settings.name}: {', '.join(words)}"] if words else []), stuck
