"""When a failed inbound message is tried again, and which ones a run tries.

A message that failed is usually waiting for something outside this app's
control: a referenced record that has not arrived, an operator's fix.
Trying it again at a fixed interval costs every run the same, however
long it has been failing, and a peer can send thousands of such messages
on purpose.  So the wait doubles with each failed attempt (up to a cap),
and a run tries at most a bounded number of them, the longest overdue
first: a pile of failures costs each run a bounded amount of work, and
every message still gets its turn over later runs.

Due-ness is decided here, in Python, on ``(id, attempts, failed_at)`` of
the failed rows (no bodies): date arithmetic on a column is spelled
differently on SQLite, PostgreSQL and MariaDB, and these rows are few and
small next to what a run applies.
"""
from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .settings import CommunicatorSettings

#: ``communicator.retry_max_delay``'s default: at least one attempt an hour.
DEFAULT_MAX_DELAY = 3600

#: Above this, doubling changes nothing a cap of any sensible size would
#: not (and ``2 ** attempts`` stays a float of reasonable size).
_MAX_DOUBLINGS = 62


class FailedRow(Protocol):
    id: int
    attempts: int
    failed_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Backoff:
    """``delay * 2 ** (attempts - 1)`` seconds after the last failure,
    at most ``max_delay``: ``communicator.retry_delay`` and
    ``communicator.retry_max_delay``."""
    delay: float
    max_delay: float

    @classmethod
    def of(cls, settings: CommunicatorSettings) -> Backoff:
        """The back-off an app's settings ask for."""
        return cls(settings.retry_delay, settings.retry_max_delay)

    def wait(self, attempts: int) -> float:
        """Seconds to wait after the failure that made ``attempts``."""
        if self.delay <= 0:
            return 0.0
        doublings = min(max(attempts - 1, 0), _MAX_DOUBLINGS)
        return min(self.delay * 2.0 ** doublings, self.max_delay)

    def due_at(self, failed_at: datetime.datetime, attempts: int) -> datetime.datetime:
        """When the message that failed at ``failed_at`` may be tried again."""
        return failed_at + datetime.timedelta(seconds=self.wait(attempts))


@dataclasses.dataclass(frozen=True)
class RetryPlan:
    """Which failed messages an apply tries again."""
    #: Ids to try again in this apply.
    chosen: frozenset[int]
    #: Due, but left for a later apply by the limit.
    deferred: int = 0


def plan_retries(rows: Iterable[FailedRow], backoff: Backoff, now: datetime.datetime,
                 limit: int | None) -> RetryPlan:
    """Choose, of failed messages, those due at ``now``, at most ``limit``
    (None: all), the longest overdue first (by the time they became due,
    then by id): a message deferred now is ahead of those that become due
    later, so none is starved by others failing more often."""
    due = sorted((at, row.id) for row in rows
                 if (at := backoff.due_at(row.failed_at, row.attempts)) <= now)
    if limit is not None and len(due) > limit:
        return RetryPlan(frozenset(message_id for _, message_id in due[:limit]),
                         len(due) - limit)
    return RetryPlan(frozenset(message_id for _, message_id in due))
