"""Failed logins, counted per client address: a guesser gets 429s, not an
oracle, and the log gets a line per address per window, not per guess.

After ``communicator.login_attempts`` failed logins from one address
within ``communicator.login_window`` seconds, that address is answered
429 with ``Retry-After`` until the window ends, *without* its credentials
being checked: a throttled guesser learns nothing, right or wrong.  Other
addresses are not affected, so a guesser cannot lock central out (unless
central shares its address: behind a reverse proxy that does not pass the
client's address on, every client has the proxy's).

The windows are fixed (they start at an address's first failure) and kept
in this process's memory only: each server process counts on its own, and
a restart forgets.  The table holds at most :data:`CAPACITY` addresses;
past that, the one whose window started first is forgotten.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

#: Addresses remembered at most (a few hundred bytes each).
CAPACITY = 10_000
#: Where ``includeme`` keeps the process's :class:`LoginThrottle`.
REGISTRY_KEY = 'pyramid_communicator.throttle'


@dataclasses.dataclass
class _Window:
    started: float
    failures: int = 0


class LoginThrottle:
    """Failed logins per address, thread-safe (waitress serves requests on
    several threads) and bounded in memory.

    ``attempts`` 0 throttles nobody; failures are still counted, so that
    the log keeps its one line per address and window.
    """

    def __init__(self, attempts: int, window: float, capacity: int = CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.attempts = attempts
        self.window = window
        self.capacity = capacity
        self.clock = clock
        self._lock = threading.Lock()
        #: Oldest window first: the one to forget when the table is full.
        self._windows: collections.OrderedDict[str, _Window] = collections.OrderedDict()

    def retry_after(self, address: str | None) -> int | None:
        """Seconds until ``address`` may try again, or None if it may now.
        Asked before the credentials are looked at."""
        if not self.attempts:
            return None
        now = self.clock()
        with self._lock:
            window = self._windows.get(address or '')
            if window is None or window.failures < self.attempts:
                return None
            left = window.started + self.window - now
        if left <= 0:
            return None
        return max(1, math.ceil(left))

    def failed(self, address: str | None) -> None:
        """Count a failed login from ``address`` and log it: once when its
        window starts and once when it is throttled, not on every guess."""
        key = address or ''
        now = self.clock()
        with self._lock:
            window = self._windows.get(key)
            if window is None or now - window.started >= self.window:
                self._windows.pop(key, None)
                while len(self._windows) >= self.capacity:
                    self._windows.popitem(last=False)
                window = self._windows[key] = _Window(now)
            window.failures += 1
            failures = window.failures
        first = failures == 1
        throttled = bool(self.attempts) and failures == self.attempts
        if throttled:
            log.warning('refused unauthenticated request from %s: %d failed logins '
                        'within %g seconds; answering 429 until the window ends',
                        address, failures, self.window)
        elif first:
            log.warning('refused unauthenticated request from %s (its next failures '
                        'within %g seconds are counted, not logged)', address, self.window)

    def __len__(self) -> int:
        with self._lock:
            return len(self._windows)
