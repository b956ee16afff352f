"""Fault-injection harness: two real apps over real HTTP, faults on purpose,
then figures of what was lost, duplicated or applied out of order.

The pieces are independent so that other tests can reuse them:

- :class:`FaultProxy` sits between central and the facade on loopback and,
  when armed, misbehaves once: holds a request while the harness kills the
  client (before or after forwarding), drops the connection after the
  facade processed the request (lost acknowledgement), answers 500 without
  forwarding, or stalls past the client's timeout and forwards late.
- :class:`Pcommunicate` runs ``pcommunicate`` as a child process that the
  harness can ``kill -9`` at any moment.
- :class:`DatabaseLock` makes the facade's database refuse writes for a
  while from a connection of its own.
- :class:`Workload` writes records with unique markers on both sides,
  :class:`TagWorkload` edits the same Tags on both sides at once (and
  deletes some), and :func:`measure` compares both databases afterwards.
- :func:`run_scenario` ties them together: warm up, inject faults for a
  number of runs, recover with runs without faults, measure.

The run size comes from ``COMMUNICATOR_FAULT_RUNS`` (fault runs per
scenario) and the randomness from ``COMMUNICATOR_FAULT_SEED``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import http.client
import http.server
import json
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
from convergence import TAG_ATTRS, Editor, conflicts, differences
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post

BIN = Path(sys.executable).parent
#: How long a held request waits for the harness to kill the client.
HOLD_LIMIT = 30.0
#: Runs without faults allowed to bring both sides to the same state.
MAX_RECOVERY_RUNS = 6
#: The client's timeout during fault runs (the stall fault waits past it).
FAULT_TIMEOUT = 1.0
#: The client's timeout in recovery runs: slow is not a fault there.
RECOVERY_TIMEOUT = 20.0
#: Fault runs per ``COMMUNICATOR_FAULT_RUNS``, for scenarios that go
#: through a list of faults in turn.
RUNS_FACTOR = {'concurrent_edits': 2}
#: ``communicator.retry_delay`` on both apps: short, so that a message that
#: failed during a fault is retried within the recovery runs, but not 0,
#: so that the delay itself is exercised.
RETRY_DELAY = 1
DEFAULT_RUNS = 3

_HOP_BY_HOP = frozenset({'connection', 'keep-alive', 'proxy-connection', 'te', 'trailer',
                         'transfer-encoding', 'upgrade', 'host', 'content-length'})


def fault_runs() -> int:
    """Fault runs per scenario: short for CI, ``COMMUNICATOR_FAULT_RUNS`` for long."""
    return max(1, int(os.environ.get('COMMUNICATOR_FAULT_RUNS', DEFAULT_RUNS)))


def scenario_runs(name: str) -> int:
    return fault_runs() * RUNS_FACTOR.get(name, 1)


def fault_seed() -> int:
    """A seed printed with the table, so a failing run can be replayed."""
    raw = os.environ.get('COMMUNICATOR_FAULT_SEED')
    return int(raw) if raw else random.SystemRandom().randrange(2 ** 32)


# -- the apps, as the fixtures in tests/conftest.py provide them --------------

class SideLike(Protocol):
    name: str
    url: str
    engine: Engine

    def session(self) -> AbstractContextManager[Session]: ...
    def count(self, table: str, where: str = '1=1') -> int: ...
    def rows(self, table: str, order_by: str = 'id') -> list[dict]: ...


class ServerLike(Protocol):
    url: str

    def start(self) -> Any: ...
    def stop(self) -> None: ...

    def create_post(self, **fields: Any) -> dict: ...
    def update_post(self, post_id: int, **fields: Any) -> dict: ...


# -- the proxy ------------------------------------------------------------------

ACTIONS = ('kill_before', 'kill_after', 'drop_after', 'error_500', 'stall')


@dataclasses.dataclass
class Fault:
    """One misbehaviour of the proxy, on the ``skip``-th next request that
    matches ``method`` and ``path`` (query string ignored).

    ``kill_before``/``kill_after`` hold the request (before or after the
    facade has processed it) until ``release`` is set: the harness kills
    the client meanwhile, then the connection is dropped.
    """
    action: str
    method: str
    path: str
    skip: int = 0
    stall: float = 0.0
    fired: threading.Event = dataclasses.field(default_factory=threading.Event)
    release: threading.Event = dataclasses.field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f'unknown fault action {self.action!r}')

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and path.split('?', 1)[0] == self.path


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection (HTTP/1.0): a dropped connection is then
    unambiguous for the client, and nothing is pooled across faults."""
    protocol_version = 'HTTP/1.0'
    proxy: FaultProxy

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(length) if length else b''
        fault = self.proxy._take(self.command, self.path)
        action = fault.action if fault else 'pass'
        if fault is not None and action in ('error_500', 'kill_before', 'stall'):
            fault.fired.set()
        if action == 'error_500':
            self._reply(500, [('Content-Type', 'text/plain')], b'injected fault\n')
            return
        if action == 'kill_before':
            fault.release.wait(HOLD_LIMIT)
            return  # dropped: never forwarded
        if action == 'stall':
            time.sleep(fault.stall)  # the client gives up; the facade hears it late
        try:
            status, headers, data = self._forward(body)
        except OSError as exc:
            if action == 'pass':
                self._reply(502, [('Content-Type', 'text/plain')],
                            f'proxy: upstream failed: {exc}\n'.encode())
            return
        if action == 'kill_after':
            fault.fired.set()
            fault.release.wait(HOLD_LIMIT)
            return
        if action == 'drop_after':
            fault.fired.set()
            return  # the facade processed it; the reply is lost
        if action == 'stall':
            return
        self._reply(status, headers, data)

    def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        host, port = self.proxy.upstream
        conn = http.client.HTTPConnection(host, port, timeout=self.proxy.forward_timeout)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            conn.request(self.command, self.path,
                         body=body if self.command == 'POST' else None, headers=headers)
            response = conn.getresponse()
            data = response.read()
            kept = [(k, v) for k, v in response.getheaders()
                    if k.lower() not in _HOP_BY_HOP | {'date', 'server'}]
            return response.status, kept, data
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        try:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header('Content-Length', str(len(data)))
            self.send_header('Connection', 'close')
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away (killed, or timed out)


class _ProxyServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy, handler: type) -> None:
        self.proxy = proxy
        super().__init__(('127.0.0.1', 0), handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.proxy._begin()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.proxy._end()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.proxy._end()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that injects at
    most one armed :class:`Fault` at a time and otherwise relays faithfully.

    It counts requests in flight so that the harness can wait until a
    stalled request has reached the facade before it measures.
    """

    def __init__(self, upstream: str, forward_timeout: float = 60.0) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or '127.0.0.1', parts.port or 80)
        self.forward_timeout = forward_timeout
        self.requests = 0
        self.request_seen = threading.Event()
        self._fault: Fault | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._inflight = 0
        handler = type('Handler', (_ProxyHandler,), {'proxy': self})
        self._server = _ProxyServer(self, handler)
        self.url = f'http://127.0.0.1:{self._server.server_address[1]}'
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={'poll_interval': 0.05}, daemon=True)
        self._thread.start()

    def arm(self, fault: Fault) -> Fault:
        with self._lock:
            self._fault = fault
            self.request_seen.clear()
        return fault

    def disarm(self, fault: Fault | None = None) -> None:
        """Forget the armed fault and let any held request go."""
        with self._lock:
            armed, self._fault = self._fault, None
        for f in (armed, fault):
            if f is not None:
                f.release.set()

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            self.requests += 1
            self.request_seen.set()
            fault = self._fault
            if fault is None or not fault.matches(method, path):
                return None
            if fault.skip > 0:
                fault.skip -= 1
                return None
            self._fault = None
            return fault

    def _begin(self) -> None:
        with self._lock:
            self._inflight += 1

    def _end(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float = 120.0) -> None:
        """Until no request is in flight (a stalled one has been forwarded)."""
        with self._idle:
            if not self._idle.wait_for(lambda: self._inflight == 0, timeout):
                raise RuntimeError(f'proxy still has {self._inflight} requests in flight')

    def close(self) -> None:
        self.disarm()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)


# -- pcommunicate as a killable child --------------------------------------------

@dataclasses.dataclass
class RunOutcome:
    returncode: int
    output: str
    killed: bool

    @property
    def crashed(self) -> bool:
        """An uncaught exception instead of pcommunicate's one-line error."""
        return 'Traceback (most recent call last)' in self.output


class Pcommunicate:
    """``pcommunicate INI`` as child processes; every one is reaped by
    :meth:`close` even when a test fails half-way."""

    def __init__(self, ini: Path) -> None:
        self.ini = ini
        self._running: list[tuple[subprocess.Popen, Any]] = []
        #: Every finished run, in order: scenarios read their own slice.
        self.outcomes: list[RunOutcome] = []

    def start(self, ini: Path | None = None) -> subprocess.Popen:
        # A file, not a pipe: a child that logs a lot never blocks on a
        # pipe nobody reads while the harness waits for a fault.
        log = tempfile.TemporaryFile()
        process = subprocess.Popen([str(BIN / 'pcommunicate'), str(ini or self.ini)],
                                   stdout=log, stderr=subprocess.STDOUT)
        self._running.append((process, log))
        return process

    def _collect(self, process: subprocess.Popen, killed: bool) -> RunOutcome:
        for entry in list(self._running):
            if entry[0] is process:
                self._running.remove(entry)
                log = entry[1]
                log.seek(0)
                output = log.read().decode('utf-8', 'replace')
                log.close()
                outcome = RunOutcome(process.returncode, output, killed)
                self.outcomes.append(outcome)
                return outcome
        raise ValueError('not a process of this runner')

    def finish(self, process: subprocess.Popen, timeout: float = 120.0) -> RunOutcome:
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
        return self._collect(process, killed=False)

    def kill(self, process: subprocess.Popen) -> RunOutcome:
        """``kill -9`` now, if it is still running."""
        killed = process.poll() is None
        if killed:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
        return self._collect(process, killed=killed and process.returncode == -signal.SIGKILL)

    def run(self, ini: Path | None = None, timeout: float = 120.0) -> RunOutcome:
        return self.finish(self.start(ini), timeout)

    def close(self) -> None:
        for process, log in self._running:
            if process.poll() is None:
                process.kill()
            process.wait(30)
            log.close()
        self._running.clear()


def ini_with_timeout(ini: Path, timeout: float, suffix: str) -> Path:
    """A copy of an app ini with another ``communicator.timeout``."""
    content, count = re.subn(r'(?m)^communicator\.timeout\s*=.*$',
                             f'communicator.timeout = {timeout:g}', ini.read_text())
    if count != 1:
        raise ValueError(f'{ini} has no single communicator.timeout line')
    path = ini.with_name(f'{ini.stem}-{suffix}{ini.suffix}')
    path.write_text(content)
    return path


# -- the facade's database refusing writes -----------------------------------------

def database_timeouts_url(url: str) -> str:
    """The facade's URL with short lock waits, so that a locked table makes
    requests fail fast instead of hanging past the client's timeout.

    SQLite keeps the demo's own busy timeout: there requests wait for the
    lock, and are processed late, after the client gave up.
    """
    backend = make_url(url).get_backend_name()
    if backend == 'postgresql':
        return url + '?options=-c+lock_timeout=300'
    if backend in ('mysql', 'mariadb'):
        return url + '?init_command=SET+SESSION+lock_wait_timeout=1,innodb_lock_wait_timeout=1'
    return url


class DatabaseLock:
    """The facade's database refusing work, from connections of the
    harness's own.

    ``tables`` locked: ``BEGIN EXCLUSIVE`` on SQLite (the whole file;
    readers go on in WAL mode), ``LOCK TABLE ... IN ACCESS EXCLUSIVE MODE``
    on PostgreSQL, ``LOCK TABLES ... WRITE`` on MariaDB. ``tables=None``:
    the database unavailable, its open connections killed (PostgreSQL also
    refuses new ones; MariaDB finds every table locked); SQLite, a file
    the app has open, can only be locked.
    """

    def __init__(self, url: str, tables: tuple[str, ...] | None) -> None:
        self.url = url
        self.tables = tables
        self._release: Callable[[], None] | None = None

    @property
    def held(self) -> bool:
        return self._release is not None

    def acquire(self) -> None:
        url = make_url(self.url)
        backend = url.get_backend_name()
        if backend == 'sqlite':
            self._release = self._sqlite(url.database)
        elif backend == 'postgresql':
            self._release = (self._postgresql_unavailable(url) if self.tables is None
                             else self._postgresql(url))
        else:
            self._release = self._mysql(url)

    def _sqlite(self, path: str) -> Callable[[], None]:
        conn = sqlite3.connect(path, timeout=20, isolation_level=None)
        conn.execute('BEGIN EXCLUSIVE')

        def release() -> None:
            conn.execute('ROLLBACK')
            conn.close()
        return release

    def _postgresql(self, url: Any) -> Callable[[], None]:
        engine = create_engine(url, poolclass=NullPool)
        connection = engine.connect()
        connection.exec_driver_sql("SET statement_timeout = '20s'")
        connection.exec_driver_sql(
            f'LOCK TABLE {", ".join(self.tables or ())} IN ACCESS EXCLUSIVE MODE')

        def release() -> None:
            connection.rollback()
            connection.close()
            engine.dispose()
        return release

    def _postgresql_unavailable(self, url: Any) -> Callable[[], None]:
        engine = create_engine(url.set(database='postgres'), poolclass=NullPool,
                               isolation_level='AUTOCOMMIT')
        name = url.database
        with engine.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            conn.execute(text('SELECT pg_terminate_backend(pid) FROM pg_stat_activity '
                              'WHERE datname = :name AND pid <> pg_backend_pid()'),
                         {'name': name})

        def release() -> None:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            engine.dispose()
        return release

    def _mysql(self, url: Any) -> Callable[[], None]:
        engine = create_engine(url, poolclass=NullPool)
        connection = engine.connect()
        connection.exec_driver_sql('SET SESSION lock_wait_timeout = 20')
        tables = self.tables or ALL_TABLES
        connection.exec_driver_sql('LOCK TABLES ' + ', '.join(f'{t} WRITE' for t in tables))
        if self.tables is None:
            others = connection.execute(text(
                'SELECT id FROM information_schema.processlist '
                'WHERE db = DATABASE() AND id <> CONNECTION_ID()')).scalars().all()
            for thread_id in others:
                with contextlib.suppress(Exception):  # it may have gone meanwhile
                    connection.exec_driver_sql(f'KILL {int(thread_id)}')

        def release() -> None:
            connection.exec_driver_sql('UNLOCK TABLES')
            connection.rollback()
            connection.close()
            engine.dispose()
        return release

    def release(self) -> None:
        if self._release is not None:
            release, self._release = self._release, None
            release()


# -- what the apps write -----------------------------------------------------------

@dataclasses.dataclass
class Record:
    """A post with a unique marker as its title; its body names its
    latest version, so an older update applied last shows up."""
    marker: str
    owner: str  # the only side that changes it, so that no conflict is legitimate
    version: int = 0

    @property
    def body(self) -> str:
        return f'{self.marker}:v{self.version}'


class Workload:
    """Creates and updates posts on both sides, publishing every change as
    the demo app does (in the change's own transaction).

    Central writes to its database directly (it has no server); the facade
    is written through its HTTP views, or directly for bulk batches.
    """

    def __init__(self, central: SideLike, facade: SideLike, facade_server: ServerLike) -> None:
        self.sides = {'central': central, 'facade': facade}
        self.facade_server = facade_server
        self.records: dict[str, Record] = {}
        self._serial: dict[str, int] = defaultdict(int)

    def _marker(self, prefix: str) -> str:
        self._serial[prefix] += 1
        return f'{prefix}-{self._serial[prefix]}'

    def create(self, side: str, count: int, prefix: str | None = None,
               owner: str | None = None, bulk: bool = False) -> list[Record]:
        records = [Record(self._marker(prefix or side[0]), owner or side)
                   for _ in range(count)]
        if side == 'facade' and not bulk:
            for record in records:
                self.facade_server.create_post(title=record.marker, body=record.body)
        else:
            with self.sides[side].session() as session:
                for record in records:
                    post = Post(title=record.marker, body=record.body)
                    session.add(post)
                    session.flush()
                    publish(session, post)
        self.records.update((r.marker, r) for r in records)
        return records

    def update(self, record: Record) -> None:
        """One new version, published, on the record's owner side."""
        record.version += 1
        if record.owner == 'facade':
            post_id = self._local_id('facade', record.marker)
            self.facade_server.update_post(post_id, body=record.body)
        else:
            with self.sides['central'].session() as session:
                post = session.query(Post).filter_by(title=record.marker).one()
                post.body = record.body
                session.flush()
                publish(session, post)

    def _local_id(self, side: str, marker: str) -> int:
        with self.sides[side].engine.connect() as conn:
            return conn.execute(text('SELECT id FROM posts WHERE title = :t'),
                                {'t': marker}).scalar_one()

    def round(self, rng: random.Random, size: int = 4,
              sides: tuple[str, ...] = ('central', 'facade')) -> None:
        """New posts on both sides (or on ``sides``), then a few successive
        updates of posts each side owns (new ones included, before they
        ever crossed)."""
        for side in sides:
            self.create(side, rng.randint(1, size))
        for side in sides:
            owned = [r for r in self.records.values() if r.owner == side]
            for record in rng.sample(owned, min(2, len(owned))):
                for _ in range(rng.randint(1, 3)):
                    self.update(record)


@dataclasses.dataclass
class TagRecord:
    """A tag the :class:`TagWorkload` created: the value last written to
    each attribute, by either side, and who deleted it."""
    name: str
    values: dict[str, Any]
    deleted_by: str | None = None
    #: Writes by side, for the problems list.
    history: list[str] = dataclasses.field(default_factory=list)


class TagWorkload:
    """Edits the same Tags on both sides, as the demo app does
    (autopublished, deletes travel): creates on either side, updates of
    tags both sides hold (so the same record changes on both before they
    exchange), and deletes, on either side, of tags the other may be
    changing.

    Every create has a name of its own: the convergence test covers two
    sides creating the same name (``match_on``).  Every update changes
    the values it writes (a write of the value already there is no edit),
    and writes happen one after another, so the value last written to an
    attribute is the newest edit and must win on both sides (the default
    policy), and a tag deleted on either side must be gone on both.
    """

    def __init__(self, central: SideLike, facade: SideLike, facade_url: str) -> None:
        self.editor = Editor({'central': central, 'facade': facade}, random.Random(),
                             facade_url=facade_url)
        self.tags: dict[str, TagRecord] = {}
        self.edits = 0

    def create(self, side: str) -> None:
        name = self.editor.unique(f'{side[0]}tag-')
        values = self.editor.tag_values(side)
        self.editor.create_tag(side, name, values)
        self.tags[name] = TagRecord(name, dict(values), history=[f'{side} created {values}'])
        self.edits += 1

    def update(self, side: str, name: str, current: dict) -> None:
        values = {}
        for key in self.editor.tag_keys():
            value = self.editor.tag_values(side, (key,))[key]
            while value == current[key]:
                value = self.editor.tag_values(side, (key,))[key]
            values[key] = value
        self.editor.update_tag(side, name, values)
        record = self.tags[name]
        record.values.update(values)
        record.history.append(f'{side} set {values}')
        self.edits += 1

    def delete(self, side: str, name: str) -> None:
        self.editor.delete_tag(side, name)
        record = self.tags[name]
        record.deleted_by = record.deleted_by or side
        record.history.append(f'{side} deleted it')
        self.edits += 1

    def round(self, rng: random.Random, size: int = 3,
              sides: tuple[str, ...] = ('central', 'facade')) -> None:
        """A few new tags, updates of tags each side holds (the same ones
        on both, when both hold them), and sometimes a delete."""
        self.editor.rng = rng
        for _ in range(rng.randint(1, size)):
            self.create(rng.choice(sides))
        held = {side: self.editor.tags(side) for side in sides}
        shared = sorted(set.intersection(*(set(rows) for rows in held.values())))
        for side in sides:
            names = shared if shared and rng.random() < 0.7 else sorted(held[side])
            for name in rng.sample(names, min(len(names), rng.randint(1, size))):
                self.update(side, name, held[side][name])
        if rng.random() < 0.6:
            side = rng.choice(sides)
            names = sorted(self.editor.tags(side))
            if names:
                self.delete(side, rng.choice(names))


def measure_tags(central: SideLike, facade: SideLike, tags: dict[str, TagRecord],
                 figures: Figures) -> None:
    """Tags against what the :class:`TagWorkload` wrote: a tag nobody
    deleted missing on a side is lost; a deleted tag still there, or an
    attribute whose value is not the one last written, is out of order."""
    for side in (central, facade):
        rows = {row['name']: row for row in side.rows('tags')}
        for name, record in tags.items():
            row = rows.pop(name, None)
            if record.deleted_by is not None:
                if row is not None:
                    figures.out_of_order += 1
                    figures.problems.append(f'tag {name} deleted by {record.deleted_by} is '
                                            f'on {side.name}: {record.history}')
            elif row is None:
                figures.lost += 1
                figures.problems.append(f'tag {name} missing on {side.name}: '
                                        f'{record.history}')
            else:
                stale = {key: row[key] for key in TAG_ATTRS if row[key] != record.values[key]}
                if stale:
                    figures.out_of_order += 1
                    figures.problems.append(f'tag {name} on {side.name} has {stale}, last '
                                            f'written {record.values}: {record.history}')
        for name in rows:
            figures.duplicated += 1
            figures.problems.append(f'{side.name} has a tag nobody wrote: {name!r}')


# -- measuring ---------------------------------------------------------------------

@dataclasses.dataclass
class Figures:
    messages: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    final_states_equal: bool = False
    #: Inbound messages that took more than one attempt: the failure and
    #: retry path was exercised (not a fault of the add-on).
    retried: int = 0
    #: Conflicts the apps recorded (both sides), and records whose synced
    #: state differs between the sides (see :func:`convergence.differences`).
    conflicts: int = 0
    divergences: int = 0
    #: Messages a peer holds under an id its sender's restored database
    #: gave another message (or none) since, and which the sender sent
    #: again under a new id (renumbered by the healing; same body and
    #: version): not duplicates, see :func:`restore_side`.
    resent_after_restore: int = 0
    #: Messages a peer holds from a side whose restore lost them, and which
    #: it echoed back to that side (:mod:`pyramid_communicator.echoes`).
    echoed_after_restore: int = 0
    problems: list[str] = dataclasses.field(default_factory=list)


def _posts(side: SideLike) -> list[tuple[str, str]]:
    return [(row['title'], row['body']) for row in side.rows('posts')]


def _record_key(row: dict, sender: str) -> tuple:
    try:
        (name, _), = json.loads(row['body']).items()
    except (ValueError, AttributeError):
        name = '?'
    return name, row['origin'] or sender, row['original_id']


def settled(central: SideLike, facade: SideLike) -> bool:
    """Nothing left to deliver or to apply, on either side."""
    return all(
        side.count('outbound_messages', 'delivered_at IS NULL') == 0
        and side.count('inbound_messages',
                       'processed_at IS NULL AND given_up_at IS NULL') == 0
        for side in (central, facade))


def measure(central: SideLike, facade: SideLike, records: dict[str, Record],
            tags: dict[str, TagRecord] | None = None,
            before_restores: dict[str, dict[int, tuple]] | None = None) -> Figures:
    """Compare both databases with what the workload wrote.

    lost: an outbound message with no processed inbound row on the peer,
    or a record missing on a side. duplicated: an inbound (sender,
    remote_id) stored twice, an inbound row no outbound row accounts for,
    a marker with more than one post, a post without a marker, two
    mappings of one local record. out of order: a post whose body is not
    its latest version, or two messages for one record stored or applied
    in an order other than the sender's (inbound id and processed_at
    against remote_id). Tags: see :func:`measure_tags`. divergences:
    records whose synced state differs between the sides; final states
    equal: none, and the same posts.

    ``before_restores``: per side, its outbound messages (id: body and
    version) as they were just before its database was restored. A peer
    may hold one of those ids that the restored side no longer has: the
    message was delivered after the backup, the backup held it
    undelivered, and the healing gave it a new id and sent it again. Such
    a row counts as ``resent_after_restore`` (not duplicated) only if the
    restored side still has a message of the same body and version.
    """
    figures = Figures()
    sides = {'central': central, 'facade': facade}
    for name, side in sides.items():
        peer = facade if name == 'central' else central
        outbound = side.rows('outbound_messages')
        figures.messages += len(outbound)
        inbound = [row for row in peer.rows('inbound_messages') if row['sender'] == name]
        by_remote: dict[int, list[dict]] = defaultdict(list)
        for row in inbound:
            by_remote[row['remote_id']].append(row)
        sent = {row['id'] for row in outbound}
        current = {(row['body'], row['version']) for row in outbound}
        forgotten = (before_restores or {}).get(name, {})
        for message_id in sorted(sent):
            stored = by_remote.get(message_id, [])
            if not any(row['processed_at'] is not None for row in stored):
                figures.lost += 1
                figures.problems.append(f'{name} outbound {message_id} never applied on '
                                        f'{peer.name}: {stored and stored[0]["last_error"]}')
            if len(stored) > 1:
                figures.duplicated += len(stored) - 1
                figures.problems.append(f'{name} outbound {message_id} stored '
                                        f'{len(stored)} times on {peer.name}')
        # The restored side's messages its peer echoed back to it: of its
        # own records and of the peer's it edited (signed, of any origin).
        echoed = {row['body'] for row in side.rows('inbound_messages')
                  if row['sender'] == peer.name and row.get('signature')}
        for remote_id in sorted(set(by_remote) - sent):
            if forgotten.get(remote_id) in current:
                figures.resent_after_restore += len(by_remote[remote_id])
                continue
            if remote_id in forgotten and forgotten[remote_id][0] in echoed:
                figures.echoed_after_restore += len(by_remote[remote_id])
                continue
            figures.duplicated += len(by_remote[remote_id])
            figures.problems.append(f'{peer.name} holds inbound {name}#{remote_id} '
                                    'that was never sent')
        # Per record: stored and applied in the sender's order.
        by_record: dict[tuple, list[dict]] = defaultdict(list)
        for row in inbound:
            by_record[_record_key(row, name)].append(row)
        for key, rows in by_record.items():
            rows.sort(key=lambda row: row['remote_id'])
            for before, after in zip(rows, rows[1:], strict=False):
                if before['id'] > after['id']:
                    figures.out_of_order += 1
                    figures.problems.append(f'{peer.name} stored {name}#{after["remote_id"]} '
                                            f'before #{before["remote_id"]} ({key})')
                if (before['processed_at'] and after['processed_at']
                        and before['processed_at'] > after['processed_at']):
                    figures.out_of_order += 1
                    figures.problems.append(f'{peer.name} applied {name}#{after["remote_id"]} '
                                            f'before #{before["remote_id"]} ({key})')
        figures.retried += sum(1 for row in inbound if row['attempts'] > 1)
        local_ids = [(row['name'], row['local_id'])
                     for row in side.rows('communicator_mappings')
                     if row['origin'] and row['local_id'] is not None]
        figures.duplicated += len(local_ids) - len(set(local_ids))
    states = {}
    for name, side in sides.items():
        posts = _posts(side)
        states[name] = sorted(posts)
        titles: dict[str, list[str]] = defaultdict(list)
        for title, body in posts:
            titles[title].append(body)
        for marker, record in records.items():
            bodies = titles.pop(marker, [])
            if not bodies:
                figures.lost += 1
                figures.problems.append(f'{marker} missing on {name}')
                continue
            if len(bodies) > 1:
                figures.duplicated += len(bodies) - 1
                figures.problems.append(f'{marker} appears {len(bodies)} times on {name}')
            if any(body != record.body for body in bodies):
                figures.out_of_order += 1
                figures.problems.append(f'{marker} on {name} is {bodies}, '
                                        f'latest is {record.body!r}')
        for title, bodies in titles.items():
            figures.duplicated += len(bodies)
            figures.problems.append(f'{name} has posts nobody wrote: {title!r} x{len(bodies)}')
    if tags is not None:
        measure_tags(central, facade, tags, figures)
    found = differences(central, facade)
    figures.divergences = len(found)
    figures.problems += found
    figures.conflicts = conflicts(central, facade)
    figures.final_states_equal = states['central'] == states['facade'] and not found
    return figures


# -- scenarios ---------------------------------------------------------------------

@dataclasses.dataclass
class Rig:
    """Two apps wired through the proxy, ready for a scenario."""
    backend: str
    central: SideLike
    facade: SideLike
    facade_server: ServerLike
    proxy: FaultProxy
    runner: Pcommunicate
    recovery_ini: Path
    batch_size: int
    workload: Workload = dataclasses.field(init=False)
    tags: TagWorkload = dataclasses.field(init=False)
    #: Per side, its outbound messages just before each restore of its
    #: database (see :func:`measure`).
    before_restores: dict[str, dict[int, tuple]] = dataclasses.field(
        default_factory=lambda: defaultdict(dict))
    #: What restores did, for the notes (see :func:`restore_side`).
    restore_counts: dict[str, int] = dataclasses.field(
        default_factory=lambda: defaultdict(int))

    def __post_init__(self) -> None:
        self.workload = Workload(self.central, self.facade, self.facade_server)
        self.tags = TagWorkload(self.central, self.facade, self.facade_server.url)

    def pending_batches(self, side: SideLike) -> int:
        """HTTP batches the next push (central) or pull (facade) will take."""
        pending = side.count('outbound_messages', 'delivered_at IS NULL')
        return max(1, math.ceil(pending / self.batch_size))

    def kill_on(self, fault: Fault, during: Callable[[], None] | None = None) -> RunOutcome:
        """Run pcommunicate with ``fault`` armed; ``kill -9`` it while the
        proxy holds the matching request (after calling ``during``, if given)."""
        self.proxy.arm(fault)
        process = self.runner.start()
        try:
            if wait_until(lambda: fault.fired.is_set() or process.poll() is not None,
                          HOLD_LIMIT) and fault.fired.is_set():
                if during is not None:
                    during()
                return self.runner.kill(process)
            return self.runner.finish(process)
        finally:
            self.proxy.disarm(fault)

    def restore(self, backup: Any) -> None:
        """Put ``backup`` (a :class:`test_restores.Backup`) back: nobody
        may use that database meanwhile, so the facade's server is stopped
        and started again around it (central has no server: the caller
        made sure no pcommunicate runs)."""
        side = backup.side
        self.proxy.wait_idle()  # a request forwarded late reaches the facade first
        self.before_restores[side.name].update(
            (row['id'], (row['body'], row['version']))
            for row in side.rows('outbound_messages'))
        if side.name == 'facade':
            self.facade_server.stop()
            try:
                backup.restore()
            finally:
                self.facade_server.start()
        else:
            backup.restore()
        side.engine.dispose()

    def facade_answers(self, attempts: int = 5) -> None:
        """Let the facade's demo views answer again before the workload
        uses them: the first request after its database connections were
        killed fails once, and then the pool reconnects."""
        for _ in range(attempts):
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.facade_server.url + '/posts', timeout=10).ok:
                    return
        raise RuntimeError(f'the facade does not answer after {attempts} attempts')

    def recover(self) -> tuple[int, list[RunOutcome]]:
        """Runs without faults until nothing is left in flight (bounded)."""
        outcomes = []
        self.proxy.disarm()
        for _ in range(MAX_RECOVERY_RUNS):
            self.proxy.wait_idle()  # a stalled request reaches the facade first
            outcomes.append(self.runner.run(self.recovery_ini))
            if settled(self.central, self.facade):
                break
        return len(outcomes), outcomes


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


_KINDS = (('POST', '/messages.json'), ('GET', '/messages.json'),
          ('POST', '/messages/delivered.json'))


def kill_before_post(rig: Rig, rng: random.Random, run: int) -> bool:
    """The proxy has the push but the facade never sees it; kill -9."""
    rig.workload.round(rng)
    skip = rng.randrange(rig.pending_batches(rig.central))
    return rig.kill_on(Fault('kill_before', 'POST', '/messages.json', skip=skip)).killed


def kill_after_facade_commit(rig: Rig, rng: random.Random, run: int) -> bool:
    """The facade stored the push and answered; kill -9 before central
    marks the messages delivered."""
    rig.workload.round(rng)
    skip = rng.randrange(rig.pending_batches(rig.central))
    return rig.kill_on(Fault('kill_after', 'POST', '/messages.json', skip=skip)).killed


def kill_during_pull(rig: Rig, rng: random.Random, run: int) -> bool:
    """kill -9 with a pulled batch served but not stored, stored but not
    acknowledged, or acknowledged but the reply not yet read."""
    rig.workload.round(rng)
    skip = rng.randrange(rig.pending_batches(rig.facade))
    action, method, path = (
        ('kill_after', 'GET', '/messages.json'),
        ('kill_before', 'POST', '/messages/delivered.json'),
        ('kill_after', 'POST', '/messages/delivered.json'))[run % 3]
    return rig.kill_on(Fault(action, method, path, skip=skip)).killed


def kill_while_applying(rig: Rig, rng: random.Random, run: int) -> bool:
    """A large pulled batch; kill -9 once central has applied a random
    part of it (watched through its inbound processed count)."""
    size = 120
    rig.workload.round(rng, size=2)
    rig.workload.create('facade', size, bulk=True)
    done = 'processed_at IS NOT NULL'
    target = rig.central.count('inbound_messages', done) + rng.randint(1, size * 3 // 4)
    process = rig.runner.start()
    reached = wait_until(lambda: process.poll() is not None
                         or rig.central.count('inbound_messages', done) >= target, 60, 0.01)
    if reached and process.poll() is None:
        return rig.runner.kill(process).killed
    rig.runner.finish(process)
    return False


def kill_at_random_time(rig: Rig, rng: random.Random, run: int) -> bool:
    """kill -9 at a random moment: on even runs a few milliseconds after a
    random request of the exchange arrived (so it lands inside it), on odd
    runs a random time after the process started (start-up, the run lock,
    the exchange or applying; it may also come too late)."""
    rig.workload.round(rng, size=6)
    rig.workload.create(rng.choice(('central', 'facade')), rng.randint(10, 80), bulk=True)
    pull_batches = rig.pending_batches(rig.facade)
    requests_expected = rig.pending_batches(rig.central) + 2 * pull_batches
    before = rig.proxy.requests
    process = rig.runner.start()
    if run % 2 == 0:
        target = before + rng.randint(1, requests_expected)
        wait_until(lambda: rig.proxy.requests >= target or process.poll() is not None, 30)
        delay = rng.uniform(0.0, 0.05)
    else:
        delay = rng.uniform(0.2, 1.5)
    deadline = time.monotonic() + delay
    wait_until(lambda: process.poll() is not None or time.monotonic() >= deadline, 5)
    return rig.runner.kill(process).killed


def _proxy_fault(action: str, rig: Rig, rng: random.Random, run: int) -> bool:
    """The fault on a push, a pull or an acknowledgement, in turn."""
    rig.workload.round(rng)
    method, path = _KINDS[run % len(_KINDS)]
    stall = FAULT_TIMEOUT + rng.uniform(0.3, 1.5)
    fault = rig.proxy.arm(Fault(action, method, path, stall=stall))
    try:
        rig.runner.run()
    finally:
        rig.proxy.disarm(fault)
    return fault.fired.is_set()


def proxy_lost_reply(rig: Rig, rng: random.Random, run: int) -> bool:
    """The facade processed the request; the connection drops before the reply."""
    return _proxy_fault('drop_after', rig, rng, run)


def proxy_error_500(rig: Rig, rng: random.Random, run: int) -> bool:
    """HTTP 500 without forwarding."""
    return _proxy_fault('error_500', rig, rng, run)


def proxy_stall(rig: Rig, rng: random.Random, run: int) -> bool:
    """No answer within the client's timeout; the facade gets the request
    late, possibly while the next run is already talking to it."""
    return _proxy_fault('stall', rig, rng, run)


#: The faults the concurrent edits meet, in turn: (action, method, path).
CONCURRENT_FAULTS = (
    ('kill_before', 'POST', '/messages.json'),
    ('kill_after', 'POST', '/messages.json'),
    ('drop_after', 'POST', '/messages/delivered.json'),
    ('kill_after', 'GET', '/messages.json'),
    ('stall', 'POST', '/messages.json'),
    ('drop_after', 'POST', '/messages.json'),
)


def concurrent_edits(rig: Rig, rng: random.Random, run: int) -> bool:
    """Both sides edit the same Tags, and delete some, before every run
    and again while it is held at a fault or stalled, under the faults of
    :data:`CONCURRENT_FAULTS` in turn: kill -9 before the push reaches the
    facade, after the facade committed it (re-sent), in a pull (served,
    not stored); a lost acknowledgement and a lost push reply (served and
    sent again); a stalled push the facade applies late, after central's
    next edits."""
    rig.workload.round(rng, size=2)
    rig.tags.round(rng)
    action, method, path = CONCURRENT_FAULTS[run % len(CONCURRENT_FAULTS)]
    if action.startswith('kill'):
        # Nobody writes either database while the proxy holds the request:
        # the facade has answered it (or never seen it), central waits.
        fault = Fault(action, method, path)
        return rig.kill_on(fault, during=lambda: rig.tags.round(rng, size=2)).killed
    stall = FAULT_TIMEOUT + rng.uniform(0.5, 1.5)
    fault = rig.proxy.arm(Fault(action, method, path, stall=stall))
    try:
        rig.runner.run()
    finally:
        rig.proxy.disarm(fault)
    # The stalled push reaches the facade while central edits (only
    # central: the facade is applying it meanwhile).
    rig.tags.round(rng, size=2, sides=('central',) if action == 'stall' else (
        'central', 'facade'))
    return fault.fired.is_set()


def _kill_in_exchange(rig: Rig, rng: random.Random) -> bool:
    """Start pcommunicate and ``kill -9`` it a few milliseconds after a
    random request of its exchange reached the proxy (the checkpoint, a
    push, a pull or an acknowledgement; it may have finished by then)."""
    expected = 1 + rig.pending_batches(rig.central) + 2 * rig.pending_batches(rig.facade)
    target = rig.proxy.requests + rng.randint(1, expected)
    process = rig.runner.start()
    wait_until(lambda: rig.proxy.requests >= target or process.poll() is not None, 30)
    deadline = time.monotonic() + rng.uniform(0.0, 0.05)
    wait_until(lambda: process.poll() is not None or time.monotonic() >= deadline, 5)
    return rig.runner.kill(process).killed


def _held_by_peer(peer: SideLike, restored: str) -> dict[str, int]:
    """The versions of posts the peer holds, or has stored from the
    restored side to apply: marker -> the newest version."""
    held: dict[str, int] = {}

    def note(body: str) -> None:
        marker, _, version = body.rpartition(':v')
        if marker and version.isdigit():
            held[marker] = max(held.get(marker, 0), int(version))

    for _, body in _posts(peer):
        note(body)
    for row in peer.rows('inbound_messages'):
        if row['sender'] == restored and row['refused_at'] is None:
            try:
                note(json.loads(row['body'])['post']['body'])
            except (ValueError, KeyError, TypeError):
                continue
    return held


def restore_side(rig: Rig, rng: random.Random, run: int, restored: str,
                 sends: bool = False) -> bool:
    """One side's database put back from a backup taken at a random
    earlier point, with both sides working and runs going on around it.

    1. Both sides write, with 0-2 runs; then more writes from both, which
       the backup holds undelivered (a run after the backup delivers them,
       the restore makes them undelivered again: the healing renumbers
       them and sends them again).
    2. The backup (the backend's own: :class:`test_restores.Backup`).
    3. 1-3 runs, before each of which the *other* side writes (creates,
       and edits of the records it owns, some made by the restored side);
       on odd runs the last one is killed (``kill -9``) inside its
       exchange, at a random request, and the restore follows at once,
       with the run in flight.
    4. The restored side writes (creates and edits) once more, and its
       database is restored before any run: the facade's server stopped,
       its database put back, the server started again; central's put
       back with no pcommunicate running.
    5. Both sides write again; the next run must find the restore.

    What the harness does not count as lost: what step 4 wrote. A restore
    takes a database back to its backup, and these writes came after it
    and never left that database (no run in between), so they are gone by
    the nature of a restore: such records are dropped from the workload's
    expectations, and such edits taken back (the record is expected at
    the version it had at the backup). Everything else must survive on
    both sides: what the other side wrote at any time, and everything the
    restored side wrote before the backup, sent or not.

    The documented limits of :mod:`pyramid_communicator.restores` are
    avoided, not measured: the restored side writes nothing between the
    backup and the restore that a run could carry to its peer (step 3 is
    the other side's only). Step 4's records, never sent, have their ids
    reused by step 5's: harmless, the peer never saw them.

    ``sends``: the restored side writes in step 3 too (creates, and edits
    of the records it owns, of its own origin or of the peer's: the
    :mod:`pyramid_communicator.echoes` give back every message it signed),
    and the runs carry them to the peer: what the peer holds of them (stored, applied
    or not) must come back, what it does not is gone with the restore.
    Step 5 is then the other side's only, followed by a run, and only
    then does the restored side write (a record it made between the
    restore and the healing run could take the id of one the peer holds:
    a documented limit).
    """
    from test_restores import Backup
    workload = rig.workload
    other = 'central' if restored == 'facade' else 'facade'
    side = rig.facade if restored == 'facade' else rig.central
    counts = rig.restore_counts
    for _ in range(rng.randint(0, 2)):
        workload.round(rng, size=3)
        rig.runner.run()
    workload.round(rng, size=3)
    peer = rig.central if restored == 'facade' else rig.facade
    with tempfile.TemporaryDirectory() as directory:
        backup = Backup(side, Path(directory))
        at_backup = {marker: record.version for marker, record in workload.records.items()
                     if record.owner == restored}
        steps = rng.randint(1, 3)
        for step in range(steps):
            workload.round(rng, size=3, sides=(other,))
            if sends:
                workload.create(restored, rng.randint(1, 2))
                # Its own records and the peer's it edits (x-/y- records).
                own = [r for r in workload.records.values() if r.owner == restored]
                for record in rng.sample(own, min(3, len(own))):
                    workload.update(record)
            if run % 2 == 1 and step == steps - 1:
                counts['killed in flight'] += _kill_in_exchange(rig, rng)
            else:
                rig.runner.run()
        counts['runs between backup and restore'] += steps
        # Written after the backup, gone with the restore before any run.
        versions = {marker: record.version for marker, record in workload.records.items()
                    if record.owner == restored}
        known = set(workload.records)
        if sends:  # what the restored side sent comes back; the rest is gone
            rig.proxy.wait_idle()
            held = _held_by_peer(peer, restored)
            versions = {marker: max(at_backup.get(marker, 0), held.get(marker, 0))
                        for marker in versions if marker in at_backup or marker in held}
            known -= {marker for marker, record in workload.records.items()
                      if record.owner == restored and marker not in versions}
            counts['records and edits sent, then restored away'] += sum(
                held.get(marker, 0) > at_backup.get(marker, -1) for marker in versions)
        workload.round(rng, size=3, sides=(restored,))
        rig.restore(backup)
    gone = [marker for marker in workload.records if marker not in known]
    for marker in gone:
        del workload.records[marker]
    counts['restores'] += 1
    counts['records gone with the restore'] += len(gone)
    for marker, version in versions.items():
        record = workload.records[marker]
        counts['edits gone with the restore'] += record.version - version
        record.version = version
    if restored == 'facade':
        rig.facade_answers()
    if sends:
        workload.round(rng, size=3, sides=(other,))
        # The healing run must be done before the restored side writes (a
        # run can fail on this loaded machine: a timeout; it is run again).
        for _ in range(3):
            outcome = rig.runner.run()
            if outcome.returncode == 0:
                break
            counts['healing runs failed and run again'] += 1
            print(f'healing run failed: {outcome.output.strip()[-300:]}')
    workload.round(rng, size=3)
    return True


def restore_facade(rig: Rig, rng: random.Random, run: int) -> bool:
    """The facade's database restored from a backup (see :func:`restore_side`)."""
    return restore_side(rig, rng, run, 'facade')


def restore_central(rig: Rig, rng: random.Random, run: int) -> bool:
    """Central's database restored from a backup (see :func:`restore_side`)."""
    return restore_side(rig, rng, run, 'central')


def restore_facade_after_sending(rig: Rig, rng: random.Random, run: int) -> bool:
    """The facade restored after it sent records and edits of its own."""
    return restore_side(rig, rng, run, 'facade', sends=True)


def restore_central_after_sending(rig: Rig, rng: random.Random, run: int) -> bool:
    """Central restored after it sent records and edits of its own."""
    return restore_side(rig, rng, run, 'central', sends=True)


QUEUE_TABLES = ('inbound_messages', 'outbound_messages', 'communicator_state')
RECORD_TABLES = ('posts', 'communicator_mappings')
ALL_TABLES = QUEUE_TABLES + RECORD_TABLES
#: What the facade's database refuses, in turn; None: unavailable.
REFUSALS: tuple[tuple[str, ...] | None, ...] = (QUEUE_TABLES, None, RECORD_TABLES, ALL_TABLES)


def facade_database_refuses_writes(rig: Rig, rng: random.Random, run: int) -> bool:
    """The facade's queues locked, the database unavailable, its records
    locked, or all locked, in turn; from before the run or from a random
    moment in it (every other run), until a little after it ended."""
    rig.workload.round(rng)
    lock = DatabaseLock(rig.facade.url, REFUSALS[run % len(REFUSALS)])
    fired = False
    try:
        if run % 2 == 0:
            lock.acquire()
            fired = True
        rig.proxy.request_seen.clear()
        process = rig.runner.start()
        if not lock.held:
            wait_until(lambda: rig.proxy.request_seen.is_set() or process.poll() is not None, 30)
            time.sleep(rng.uniform(0.0, 0.3))
            lock.acquire()
            fired = process.poll() is None
        outcome = rig.runner.finish(process)
        time.sleep(rng.uniform(0.0, 0.5))  # refusing a little longer than the client waits
    finally:
        lock.release()
        rig.facade.engine.dispose()  # the harness's own connections may have been killed
        rig.facade_answers()
    return fired and outcome.returncode in (0, 1)


SCENARIOS: dict[str, tuple[str, Callable[[Rig, random.Random, int], bool]]] = {
    'kill_before_post': ('kill -9 before the POST', kill_before_post),
    'kill_after_commit': ("kill -9 after facade's commit, before marked delivered",
                          kill_after_facade_commit),
    'kill_during_pull': ('kill -9 in a pull (before store / before, after ack)',
                         kill_during_pull),
    'kill_while_applying': ('kill -9 while applying a pulled batch', kill_while_applying),
    'kill_random_time': ('kill -9 at a random time', kill_at_random_time),
    'proxy_lost_reply': ('proxy drops reply after facade processed', proxy_lost_reply),
    'proxy_500': ('proxy answers 500', proxy_error_500),
    'proxy_stall': ('proxy stalls past the timeout', proxy_stall),
    'facade_db_locked': ("facade's database refuses writes", facade_database_refuses_writes),
    'concurrent_edits': ('concurrent edits of tags on both sides, faults in turn',
                         concurrent_edits),
    'restore_facade': ("facade's database restored from an earlier backup", restore_facade),
    'restore_central': ("central's database restored from an earlier backup",
                        restore_central),
    'restore_facade_sent': ('facade restored after sending records of its own',
                            restore_facade_after_sending),
    'restore_central_sent': ('central restored after sending records of its own',
                             restore_central_after_sending),
}


@dataclasses.dataclass
class ScenarioResult:
    scenario: str
    backend: str
    runs: int
    faults_hit: int
    recovery_runs: int
    figures: Figures
    exits: dict[int, int]
    #: Exit status of each recovery run: the last one must be 0. An earlier
    #: one may fail, e.g. on a pooled connection the fault killed.
    recovery_exits: list[int]
    last_recovery_output: str
    crashes: list[str]
    #: Creates, updates and deletes of tags by the :class:`TagWorkload`.
    tag_edits: int = 0
    #: Restore scenarios: what the restores did (see :func:`restore_side`).
    restore_notes: str = ''


    def to_json(self) -> str:
        """For the test's report: the table is made in pytest's main
        process, which gets reports (not objects) from pytest-xdist workers."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> ScenarioResult:
        fields = json.loads(raw)
        fields['figures'] = Figures(**fields['figures'])
        fields['exits'] = {int(code): count for code, count in fields['exits'].items()}
        return cls(**fields)


def run_scenario(rig: Rig, name: str, runs: int, rng: random.Random) -> ScenarioResult:
    """Warm up, inject ``runs`` faults, recover without faults, measure."""
    title, inject = SCENARIOS[name]
    workload = rig.workload
    # Posts that cross before the faults, then get changed by the other side:
    # updates of a record that originated on the peer.
    workload.create('central', 2, prefix='x', owner='facade')
    workload.create('facade', 2, prefix='y', owner='central', bulk=True)
    if name == 'concurrent_edits':
        rig.tags.round(rng)
    rig.recover()
    first = len(rig.runner.outcomes)
    hits = sum(bool(inject(rig, rng, run)) for run in range(runs))
    exits: dict[int, int] = defaultdict(int)
    crashes: list[str] = []
    for outcome in rig.runner.outcomes[first:]:
        exits[outcome.returncode] += 1
        if outcome.crashed:
            crashes.append(outcome.output[-1500:])
    recovery_runs, outcomes = rig.recover()
    crashes += [o.output[-1500:] for o in outcomes if o.crashed]
    figures = measure(rig.central, rig.facade, workload.records, rig.tags.tags,
                      rig.before_restores)
    notes = ''
    if rig.restore_counts:
        detected = sum('restored from a backup' in outcome.output
                       for outcome in rig.runner.outcomes[first:])
        notes = ', '.join(f'{key}: {value}' for key, value in rig.restore_counts.items())
        notes += (f', runs that found a restore: {detected}, messages sent again '
                  f'under a new id: {figures.resent_after_restore}, messages echoed back: '
                  f'{figures.echoed_after_restore}')
    return ScenarioResult(title, rig.backend, runs, hits, recovery_runs, figures,
                          dict(exits), [o.returncode for o in outcomes],
                          outcomes[-1].output[-1500:], crashes, rig.tags.edits, notes)


# -- the table ---------------------------------------------------------------------

COLUMNS = ('scenario', 'runs', 'faults hit', 'messages', 'lost', 'duplicated',
           'out of order', 'final states equal', 'recovery runs', 'conflicts', 'divergences')


def format_table(results: list[ScenarioResult], backend: str = '', seed: int | None = None,
                 ) -> str:
    rows = [(r.scenario, r.runs, r.faults_hit, r.figures.messages, r.figures.lost,
             r.figures.duplicated, r.figures.out_of_order,
             'yes' if r.figures.final_states_equal else 'NO', r.recovery_runs,
             r.figures.conflicts, r.figures.divergences)
            for r in results]
    cells = [COLUMNS] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]

    def line(row: tuple) -> str:
        return ' | '.join(cell.ljust(w) if i == 0 else cell.rjust(w)
                          for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
    out = []
    if backend:
        out.append(f'fault harness on {backend}'
                   + (f' (COMMUNICATOR_FAULT_SEED={seed})' if seed is not None else ''))
    out += [line(cells[0]), '-+-'.join('-' * w for w in widths)]
    out += [line(row) for row in cells[1:]]
    return '\n'.join(out)


def format_notes(results: list[ScenarioResult]) -> str:
    """What the faults did, beyond the figures: how pcommunicate exited
    (-9: killed) and how many inbound messages needed a retry."""
    lines = []
    for r in results:
        exits = ', '.join(f'{code}: {count}' for code, count in sorted(r.exits.items()))
        lines.append(f'{r.scenario}: fault-run exits {{{exits}}}; recovery-run exits '
                     f'{r.recovery_exits}; inbound messages retried after a failure: '
                     f'{r.figures.retried}' + (f'; tag edits: {r.tag_edits}' if r.tag_edits
                                                else '')
                     + (f'; {r.restore_notes}' if r.restore_notes else ''))
    return '\n'.join(lines)
