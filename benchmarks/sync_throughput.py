"""End-to-end sync throughput on one backend, next to what the raw driver
does for the same work, in one run:

    .venv/bin/python benchmarks/sync_throughput.py [--db sqlite|postgresql|mysql]
        [--records N] [--idle-messages M] [--requests K] [--batch-size B]

It starts two real apps, each on a fresh database of its own: the facade
served by ``pserve`` (waitress) on a free loopback port, and central as an
ini file that ``pcommunicate`` (a subprocess) runs against.  Then:

1. push: N tags created on central (autopublished, in big transactions,
   untimed), then ``pcommunicate central.ini --push`` timed until the
   facade holds N tags and no inbound message is pending or failed (the
   facade applies in the request's after-commit hook);
2. pull: N tags created in the facade's database (autopublished into its
   outbound queue), then ``pcommunicate central.ini --pull`` timed (pull,
   store, acknowledge, apply at central);
3. raw: the same work with the raw driver only (sqlite3, psycopg
   ``executemany``, PyMySQL ``executemany``): read (id, body, origin,
   original_id) from an outbound-like table, JSON-encode and gzip as the
   wire does, decode, insert inbound-like rows and tag-like rows, commit,
   mark the batch delivered at the source, commit; batches of the same
   size, on scratch tables (``bench_raw_*``) in the same two databases,
   both directions;
4. peak RSS of each ``pcommunicate`` process (``os.wait4`` rusage of that
   one child) and of the facade server (``VmHWM``), and the CPU seconds of
   both during the push and the pull;
5. publish overhead: one-record requests that create a tag (autopublished)
   against the same request for an unsynced model of the same shape,
   interleaved in rounds: in process (WebTest: the add-on's cost against
   the bare minimum of a request), and over loopback HTTP to the same app
   under waitress in a process of its own (what a user of the host app
   waits for), with the server's CPU time per request beside the wall time;
6. idle: ``pcommunicate central.ini`` with nothing to do, on a central
   database holding M delivered outbound and M applied inbound messages
   (all recent, so ``communicator.retention_days`` = 7 keeps them), against
   the same run on an empty one (a second database): a first run that also
   does the hourly purge, then the median of five, the two databases
   taking turns run by run (wall time, CPU time of the process, and the
   time pcommunicate reports for its work after start-up).  The rows are made with INSERT ...
   SELECT (a recursive CTE on SQLite, ``generate_series`` on PostgreSQL,
   MariaDB's ``seq_1_to_N``); PostgreSQL gets the ANALYZE that autovacuum
   would run shortly after.

Settings: ``communicator.batch_size`` 1000 (``--batch-size``),
``communicator.retry_delay`` 0 and ``communicator.timeout`` 600 (the
facade applies a whole batch before it answers a push).  Each part has
databases of its own (labels central, facade, web, idle).

Server URLs for PostgreSQL and MariaDB come from ``COMMUNICATOR_TEST_PG_URL``
and ``COMMUNICATOR_TEST_MYSQL_URL`` as in the tests; databases
``bench_<random>_<label>`` are created there and dropped at the end (also
on error or Ctrl-C).  Figures are from one run on a possibly shared
machine: compare ratios, not seconds.  Never used as a test.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gzip
import hashlib
import json
import os
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import transaction
import zope.sqlalchemy
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    create_engine,
    text,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from pyramid_communicator.demo import create_tables
from pyramid_communicator.demo.models import Tag, get_engine
from pyramid_communicator.models import (
    NAMING_CONVENTION,
    BodyText,
    QueueId,
    Timestamp,
    communicator_state,
    utcnow,
)
from pyramid_communicator.sync import make_session

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVER_URLS = {
    'postgresql': os.environ.get('COMMUNICATOR_TEST_PG_URL',
                                 'postgresql+psycopg://postgres@127.0.0.1:5432/test'),
    'mysql': os.environ.get('COMMUNICATOR_TEST_MYSQL_URL',
                            'mysql+pymysql://root@127.0.0.1:3306/test'),
}
USERNAME, PASSWORD = 'bench', 'bench-pass'
COLORS = ('red', 'green', 'blue', 'black', 'white')
TAG_FIELDS = ('name', 'label', 'color', 'weight')
#: Seconds central's client waits for a reply: the facade applies a whole
#: batch before it answers a push, which can take longer than the default 10.
CLIENT_TIMEOUT = 600
IDLE_REPEATS = 5
FILL_CHUNK = 250_000


def say(message: str) -> None:
    print(f'[{time.strftime("%H:%M:%S")}] {message}', file=sys.stderr, flush=True)


# -- databases ---------------------------------------------------------------

class Databases:
    """Fresh databases for this run; dropped (server backends) at the end."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.run_id = uuid.uuid4().hex[:8]
        self.created: list[str] = []
        self.engines: list[Engine] = []

    def create(self, label: str) -> str:
        if self.backend == 'sqlite':
            return f'sqlite:///{self.tmp / (label + ".sqlite")}'
        server = make_url(SERVER_URLS[self.backend])
        name = f'bench_{self.run_id}_{label}'
        admin = create_engine(server, isolation_level='AUTOCOMMIT')
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE {name}'))
        admin.dispose()
        self.created.append(name)
        return server.set(database=name).render_as_string(hide_password=False)

    def engine(self, url: str) -> Engine:
        engine = get_engine({'sqlalchemy.url': url})  # WAL and busy_timeout on SQLite
        self.engines.append(engine)
        return engine

    def drop_all(self) -> None:
        for engine in self.engines:
            engine.dispose()
        if not self.created:
            return
        server = SERVER_URLS[self.backend]
        admin = create_engine(server, isolation_level='AUTOCOMMIT')
        with admin.connect() as conn:
            for name in self.created:
                force = ' WITH (FORCE)' if self.backend == 'postgresql' else ''
                try:
                    conn.execute(text(f'DROP DATABASE IF EXISTS {name}{force}'))
                except Exception as exc:  # keep dropping the others
                    print(f'could not drop database {name}: {exc}', file=sys.stderr)
        admin.dispose()
        self.created.clear()


def count(engine: Engine, table: str, where: str = '1=1') -> int:
    with engine.connect() as conn:
        return conn.execute(text(f'SELECT COUNT(*) FROM {table} WHERE {where}')).scalar()


@contextlib.contextmanager
def host_session(engine: Engine) -> Iterator[Session]:
    """A host app's session (not an applier's: autopublish publishes what
    it flushes), committed at the end of the block."""
    tm = transaction.TransactionManager(explicit=True)
    session = Session(bind=engine)
    zope.sqlalchemy.register(session, transaction_manager=tm)
    try:
        with tm:
            yield session
    finally:
        session.close()


def tag_values(prefix: str, i: int) -> dict:
    return {'name': f'{prefix}-{i}', 'label': f'Label {i}', 'color': COLORS[i % len(COLORS)],
            'weight': i % 100}


def create_tags(engine: Engine, prefix: str, n: int, chunk: int = 5000) -> float:
    """N tags through the ORM, autopublished, ``chunk`` per transaction;
    returns the seconds taken."""
    started = time.perf_counter()
    for start in range(0, n, chunk):
        with host_session(engine) as session:
            session.add_all([Tag(**tag_values(prefix, i))
                             for i in range(start, min(n, start + chunk))])
    return time.perf_counter() - started


def orm_floor(engine: Engine, prefix: str, n: int, batch: int) -> float:
    """What applying cannot do without: N tags created through the ORM
    (constructor, attributes set one by one, ``Session.add``, one flush and
    commit per batch) in a session that does not publish, as applying
    does, without anything else of the add-on; the seconds taken."""
    started = time.perf_counter()
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    try:
        for start in range(0, n, batch):
            with tm:
                for i in range(start, min(n, start + batch)):
                    tag = Tag()
                    for key, value in tag_values(prefix, i).items():
                        setattr(tag, key, value)
                    session.add(tag)
                session.flush()
    finally:
        session.close()
    return time.perf_counter() - started


# -- the two apps --------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def app_settings(url: str, name: str, batch_size: int, **extra: str) -> dict[str, str]:
    settings = {
        'sqlalchemy.url': url,
        'communicator.name': name,
        'communicator.username': USERNAME,
        'communicator.password': PASSWORD,
        'communicator.batch_size': str(batch_size),
        'communicator.retry_delay': '0',
        'communicator.timeout': str(CLIENT_TIMEOUT),
    }
    settings.update(extra)
    return settings


def write_ini(path: Path, settings: dict[str, str], port: int | None = None,
              threads: int = 4) -> Path:
    lines = ['[app:main]', 'use = egg:pyramid_communicator#demo']
    lines += [f'{key} = {value}' for key, value in settings.items()]
    if port is not None:
        lines += ['', '[server:main]', 'use = egg:waitress#main',
                  f'listen = 127.0.0.1:{port}', f'threads = {threads}']
    lines += ['', textwrap.dedent('''\
        [loggers]
        keys = root

        [handlers]
        keys = console

        [formatters]
        keys = generic

        [logger_root]
        level = WARNING
        handlers = console

        [handler_console]
        class = StreamHandler
        args = (sys.stderr,)
        level = NOTSET
        formatter = generic

        [formatter_generic]
        format = %(levelname)s [%(name)s] %(message)s
        ''')]
    path.write_text('\n'.join(lines) + '\n')
    return path


class FacadeServer:
    #: The path asked until the server answers.
    probe = '/tags'

    def __init__(self, ini: Path, port: int, log: Path) -> None:
        self.ini, self.port, self.log = ini, port, log
        self.url = f'http://127.0.0.1:{port}'
        self.process: subprocess.Popen | None = None

    def start(self) -> FacadeServer:
        import requests
        self.process = subprocess.Popen([str(BIN / 'pserve'), str(self.ini)],
                                        stdout=self.log.open('ab'), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'the facade exited: {self.log.read_text()[-2000:]}')
            try:
                requests.get(self.url + self.probe, timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError('the facade did not start within 30 seconds')

    def peak_rss_kib(self) -> int | None:
        return vm_hwm(self.process.pid) if self.process else None

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a running process so far."""
    fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmHWM:'):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Run:
    """One finished ``pcommunicate`` process."""

    def __init__(self, returncode: int, seconds: float, maxrss_kib: int, cpu: float,
                 stdout: str, stderr: str) -> None:
        self.returncode, self.seconds, self.maxrss_kib = returncode, seconds, maxrss_kib
        self.cpu = cpu
        self.stdout, self.stderr = stdout, stderr

    @property
    def summary(self) -> dict[str, float]:
        """The numbers of pcommunicate's one-line summary."""
        for line in self.stdout.splitlines():
            if line.startswith('pushed='):
                return {k: float(v) for k, v in (p.split('=') for p in line.split())}
        return {}


def pcommunicate(ini: Path, *args: str, logs: Path, label: str,
                 timeout: float = 3600) -> Run:
    """Run pcommunicate and measure it: wall time, and the peak RSS of that
    process alone (the rusage ``wait4`` returns for that one child)."""
    out, err = logs / f'{label}.out', logs / f'{label}.err'
    with out.open('w') as stdout, err.open('w') as stderr:
        started = time.perf_counter()
        process = subprocess.Popen([str(BIN / 'pcommunicate'), str(ini), *args],
                                   stdout=stdout, stderr=stderr)
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        finally:
            watchdog.cancel()
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    run = Run(process.returncode, seconds, usage.ru_maxrss, usage.ru_utime + usage.ru_stime,
              out.read_text(), err.read_text())
    if run.returncode != 0:
        raise RuntimeError(f'pcommunicate {" ".join(args)} exited with {run.returncode}: '
                           f'{run.stdout}{run.stderr[-3000:]}')
    return run


def wait_until(check: Callable[[], str | None], timeout: float = 300) -> None:
    """Poll ``check`` (None: done; else what is still missing)."""
    deadline = time.monotonic() + timeout
    while True:
        missing = check()
        if missing is None:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f'not synced after {timeout} s: {missing}')
        time.sleep(0.05)


def synced(engine: Engine, tags: int, inbound: int) -> Callable[[], str | None]:
    def check() -> str | None:
        have = count(engine, 'tags')
        stored = count(engine, 'inbound_messages')
        open_ = count(engine, 'inbound_messages', 'processed_at IS NULL')
        if have == tags and stored == inbound and open_ == 0:
            return None
        return f'{have}/{tags} tags, {stored}/{inbound} inbound stored, {open_} not applied'
    return check


def failed_inbound(engine: Engine) -> str:
    with engine.connect() as conn:
        rows = conn.execute(text(
            'SELECT id, last_error FROM inbound_messages WHERE processed_at IS NULL '
            'ORDER BY id')).all()
    return '; '.join(f'{r.id}: {r.last_error}' for r in rows[:5])


# -- raw driver ---------------------------------------------------------------

raw_metadata = MetaData(naming_convention=NAMING_CONVENTION)
Table('bench_raw_outbound', raw_metadata,
      Column('id', QueueId, primary_key=True, autoincrement=True),
      Column('body', BodyText), Column('origin', String(64)),
      Column('original_id', BigInteger), Column('delivered_at', Timestamp),
      Index('ix_bench_raw_outbound_pending', 'delivered_at', 'id'),
      sqlite_autoincrement=True)
Table('bench_raw_inbound', raw_metadata,
      Column('id', QueueId, primary_key=True, autoincrement=True),
      Column('sender', String(255)), Column('remote_id', BigInteger),
      Column('body', BodyText), Column('origin', String(64)),
      Column('original_id', BigInteger), Column('created_at', Timestamp),
      Column('processed_at', Timestamp),
      UniqueConstraint('sender', 'remote_id'),
      Index('ix_bench_raw_inbound_pending', 'processed_at', 'id'))
Table('bench_raw_tags', raw_metadata,
      Column('id', Integer, primary_key=True),
      Column('name', String(100), unique=True), Column('label', String(200)),
      Column('color', String(20)), Column('weight', Integer))


def raw_connect(url: str):
    """A DB-API connection of the raw driver, and its placeholder."""
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == 'sqlite':
        import sqlite3
        conn = sqlite3.connect(u.database, timeout=30)
        return conn, '?'
    if backend == 'postgresql':
        import psycopg
        conn = psycopg.connect(host=u.host, port=u.port or 5432, user=u.username,
                               password=u.password or None, dbname=u.database)
        return conn, '%s'
    import pymysql
    conn = pymysql.connect(host=u.host, port=u.port or 3306, user=u.username,
                           password=u.password or '', database=u.database, charset='utf8mb4')
    return conn, '%s'


def db_time(url: str, value: datetime.datetime):
    """A naive UTC timestamp as the raw driver should get it (SQLAlchemy's
    text format on SQLite)."""
    if url.startswith('sqlite'):
        return value.strftime('%Y-%m-%d %H:%M:%S.%f')
    return value


def raw_fill(url: str, n: int, prefix: str) -> None:
    conn, p = raw_connect(url)
    try:
        cur = conn.cursor()
        rows = [(json.dumps({'tag': tag_values(prefix, i)}, separators=(',', ':')), None, i + 1)
                for i in range(n)]
        for start in range(0, n, 5000):
            cur.executemany(f'INSERT INTO bench_raw_outbound (body, origin, original_id) '
                            f'VALUES ({p}, {p}, {p})', rows[start:start + 5000])
        conn.commit()
    finally:
        conn.close()


def raw_transfer(source_url: str, target_url: str, sender: str,
                 batch: int) -> tuple[float, int]:
    """The sync's work with the raw driver only: read a batch of the
    outbound-like table, encode it as the wire does (JSON, gzip level 1),
    decode it, store it as inbound-like rows (already applied) and as tags,
    commit; mark the batch delivered at the source, commit.  (Seconds, rows)."""
    source, ps = raw_connect(source_url)
    target, pt = raw_connect(target_url)
    try:
        src, dst = source.cursor(), target.cursor()
        after = moved = 0
        started = time.perf_counter()
        while True:
            src.execute(f'SELECT id, body, origin, original_id FROM bench_raw_outbound '
                        f'WHERE delivered_at IS NULL AND id > {ps} ORDER BY id LIMIT {ps}',
                        (after, batch))
            rows = src.fetchall()
            source.commit()
            if not rows:
                break
            payload = gzip.compress(json.dumps(
                [{'id': r[0], 'body': r[1], 'origin': r[2] or sender, 'original_id': r[3]}
                 for r in rows], separators=(',', ':'), ensure_ascii=False).encode('utf-8'),
                compresslevel=1, mtime=0)
            messages = json.loads(gzip.decompress(payload))
            now = db_time(target_url, utcnow())
            dst.executemany(
                f'INSERT INTO bench_raw_inbound (sender, remote_id, body, origin, original_id, '
                f'created_at, processed_at) VALUES ({pt}, {pt}, {pt}, {pt}, {pt}, {pt}, {pt})',
                [(sender, m['id'], m['body'], m['origin'], m['original_id'], now, now)
                 for m in messages])
            tags = [json.loads(m['body'])['tag'] for m in messages]
            dst.executemany(
                f'INSERT INTO bench_raw_tags (name, label, color, weight) '
                f'VALUES ({pt}, {pt}, {pt}, {pt})',
                [(t['name'], t['label'], t['color'], t['weight']) for t in tags])
            target.commit()
            ids = [m['id'] for m in messages]
            src.execute(f'UPDATE bench_raw_outbound SET delivered_at = {ps} '
                        f'WHERE id IN ({", ".join([ps] * len(ids))})',
                        (db_time(source_url, utcnow()), *ids))
            source.commit()
            after = ids[-1]
            moved += len(ids)
        seconds = time.perf_counter() - started
        return seconds, moved
    finally:
        source.close()
        target.close()


# -- publish overhead (in process) ---------------------------------------------

class PlainBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class PlainTag(PlainBase):
    """The demo's Tag without sync: same columns, no receives_from."""
    __tablename__ = 'bench_plain_tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    label: Mapped[str | None] = mapped_column(String(200))
    color: Mapped[str | None] = mapped_column(String(20))
    weight: Mapped[int | None] = mapped_column(Integer)


def create_plain_tag(request):
    """The demo's create_tag view, for the unsynced model."""
    tag = PlainTag(**{key: request.json_body.get(key) for key in TAG_FIELDS})
    request.dbsession.add(tag)
    request.dbsession.flush()
    return {'id': tag.id, **{key: getattr(tag, key) for key in TAG_FIELDS}}


def web_app(settings: dict[str, str]):
    from pyramid.config import Configurator

    from pyramid_communicator.demo.views import create_tag
    with Configurator(settings=settings) as config:
        config.include('pyramid_communicator.demo.models')  # pyramid_tm, request.dbsession
        config.include('pyramid_communicator')
        config.add_route('bench.tags', '/tags')
        config.add_view(create_tag, route_name='bench.tags', request_method='POST',
                        renderer='json')
        config.add_route('bench.plain_tags', '/plain-tags')
        config.add_view(create_plain_tag, route_name='bench.plain_tags',
                        request_method='POST', renderer='json')
    return config.make_wsgi_app()


def publish_overhead(url: str, engine: Engine, requests_each: int,
                     batch_size: int) -> dict[str, float]:
    from webtest import TestApp
    create_tables(engine)
    PlainBase.metadata.create_all(engine)
    app = TestApp(web_app(app_settings(url, 'central', batch_size)), lint=False)
    published_before = count(engine, 'outbound_messages')
    plain_before = count(engine, 'bench_plain_tags')
    seconds = {'synced': [], 'plain': []}
    paths = {'synced': '/tags', 'plain': '/plain-tags'}
    serial = 0

    def one(kind: str, timed: bool) -> None:
        nonlocal serial
        serial += 1
        body = tag_values(f'w{kind[0]}', serial)
        started = time.perf_counter()
        app.post_json(paths[kind], body, status=200)
        if timed:
            seconds[kind].append(time.perf_counter() - started)

    for _ in range(50):  # warm-up, untimed
        one('synced', False)
        one('plain', False)
    rounds = 20
    per_round = max(1, requests_each // rounds)
    for r in range(rounds):
        order = ('synced', 'plain') if r % 2 == 0 else ('plain', 'synced')
        for kind in order:
            for _ in range(per_round):
                one(kind, True)
    published = count(engine, 'outbound_messages') - published_before
    plain_rows = count(engine, 'bench_plain_tags') - plain_before
    expected = 50 + rounds * per_round
    if published != expected or plain_rows != expected:
        raise RuntimeError(f'publish overhead: {published} messages and {plain_rows} plain '
                           f'tags, expected {expected} each')
    mean = {k: statistics.fmean(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    return {'requests': rounds * per_round, 'synced_ms': 1000 * mean['synced'],
            'plain_ms': 1000 * mean['plain'], 'ratio': mean['synced'] / mean['plain'],
            'median_ratio': median['synced'] / median['plain']}


def serve_web(url: str, port: int, batch_size: int) -> None:
    """The publish-overhead app under waitress (``--serve-web``), as a user
    meets it: the same two views behind a real HTTP server."""
    import waitress
    engine = get_engine({'sqlalchemy.url': url})
    create_tables(engine)
    PlainBase.metadata.create_all(engine)
    engine.dispose()
    waitress.serve(web_app(app_settings(url, 'central', batch_size)), host='127.0.0.1',
                   port=port, threads=4, _quiet=True)


def publish_overhead_http(url: str, engine: Engine, requests_each: int, batch_size: int,
                          logs: Path) -> dict[str, float]:
    """:func:`publish_overhead` over loopback HTTP: the app served by
    waitress in a process of its own, requests from this one (keep-alive).
    Wall time per request as the client sees it, and the server's CPU
    time per request (less sensitive to other jobs on the machine)."""
    import requests
    port = free_port()
    log = (logs / 'web-http.log').open('ab')
    server = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), '--serve-web',
                               url, str(port), str(batch_size)], stdout=log,
                              stderr=subprocess.STDOUT)
    base = f'http://127.0.0.1:{port}'
    client = requests.Session()
    try:
        deadline = time.monotonic() + 30
        while True:
            if server.poll() is not None:
                raise RuntimeError('the publish-overhead server exited; see web-http.log')
            try:
                client.get(base + '/nothing', timeout=1)
                break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError('the publish-overhead server did not start') from None
                time.sleep(0.1)
        seconds: dict[str, list[float]] = {'synced': [], 'plain': []}
        cpu = {'synced': 0.0, 'plain': 0.0}
        paths = {'synced': '/tags', 'plain': '/plain-tags'}
        serial = 0

        def one(kind: str, timed: bool) -> None:
            nonlocal serial
            serial += 1
            started = time.perf_counter()
            response = client.post(base + paths[kind], json=tag_values(f'h{kind[0]}', serial),
                                   timeout=30)
            if timed:
                seconds[kind].append(time.perf_counter() - started)
            if response.status_code != 200:
                raise RuntimeError(f'POST {paths[kind]}: {response.status_code}')

        for _ in range(50):
            one('synced', False)
            one('plain', False)
        rounds = 20
        per_round = max(1, requests_each // rounds)
        for r in range(rounds):
            order = ('synced', 'plain') if r % 2 == 0 else ('plain', 'synced')
            for kind in order:
                before = cpu_seconds(server.pid)
                for _ in range(per_round):
                    one(kind, True)
                cpu[kind] += cpu_seconds(server.pid) - before
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)
        log.close()
    expected = 50 + rounds * per_round
    if count(engine, 'outbound_messages') != expected or \
            count(engine, 'bench_plain_tags') != expected:
        raise RuntimeError('publish overhead over HTTP: unexpected row counts')
    mean = {k: statistics.fmean(v) for k, v in seconds.items()}
    median = {k: statistics.median(v) for k, v in seconds.items()}
    n = rounds * per_round
    return {'requests': n, 'synced_ms': 1000 * mean['synced'], 'plain_ms': 1000 * mean['plain'],
            'ratio': mean['synced'] / mean['plain'],
            'median_ratio': median['synced'] / median['plain'],
            'synced_cpu_ms': 1000 * cpu['synced'] / n, 'plain_cpu_ms': 1000 * cpu['plain'] / n,
            'cpu_ratio': cpu['synced'] / max(cpu['plain'], 1e-9)}


# -- idle runs ------------------------------------------------------------------

BODY_HEAD = '{"tag":{"name":"old-'
BODY_TAIL = '","label":"Label","color":"red","weight":1}}'
OUT_VERSION = ('{"clock":{"":1700000000000000},"stamps":{"color":[1700000000000000,""],'
               '"label":[1700000000000000,""],"name":[1700000000000000,""],'
               '"weight":[1700000000000000,""]}}')
IN_VERSION = OUT_VERSION.replace('""', '"facade"')


def fill_history(engine: Engine, m: int) -> float:
    """M delivered outbound and M applied inbound messages, all stamped now
    (younger than any retention), with set-based SQL.  Seconds taken."""
    dialect = engine.dialect.name
    started = time.perf_counter()
    for first in range(1, m + 1, FILL_CHUNK):
        last = min(m, first + FILL_CHUNK - 1)
        now = utcnow()
        if dialect == 'sqlite':  # SQLAlchemy's text format for DateTime
            now = now.strftime('%Y-%m-%d %H:%M:%S.%f')
        params = {'head': BODY_HEAD, 'tail': BODY_TAIL, 'now': now, 'a': first, 'b': last,
                  'outv': OUT_VERSION, 'inv': IN_VERSION}
        if dialect == 'postgresql':
            source = 'generate_series(CAST(:a AS BIGINT), CAST(:b AS BIGINT)) AS seq(n)'
            body = 'CAST(:head AS TEXT) || CAST(n AS TEXT) || CAST(:tail AS TEXT)'
            prefix = ''
        elif dialect in ('mysql', 'mariadb'):
            source = f'seq_{first}_to_{last} AS seq'  # MariaDB's Sequence engine
            body = 'CONCAT(:head, seq.seq, :tail)'
            prefix = ''
        else:
            source = 'seq'
            body = ':head || n || :tail'
            prefix = ('WITH RECURSIVE seq(n) AS (SELECT :a UNION ALL '
                      'SELECT n + 1 FROM seq WHERE n < :b) ')
        n = 'seq.seq' if dialect in ('mysql', 'mariadb') else 'n'
        with engine.begin() as conn:
            conn.execute(text(
                f'{prefix}INSERT INTO outbound_messages (body, origin, original_id, version, '
                f'created_at, delivered_at) SELECT {body}, NULL, {n}, :outv, :now, :now '
                f'FROM {source}'), params)
            conn.execute(text(
                f'{prefix}INSERT INTO inbound_messages (sender, remote_id, body, origin, '
                f'original_id, version, created_at, processed_at, attempts) '
                f"SELECT 'facade', {n}, {body}, 'facade', {n}, :inv, :now, :now, 1 "
                f'FROM {source}'), params)
    if dialect == 'postgresql':  # what autovacuum's analyze does shortly after
        with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
            conn.execute(text('ANALYZE outbound_messages'))
            conn.execute(text('ANALYZE inbound_messages'))
    elif dialect == 'sqlite':
        with engine.connect() as conn:
            conn.exec_driver_sql('PRAGMA wal_checkpoint(TRUNCATE)')
    return time.perf_counter() - started


def idle_runs(sides: dict[str, tuple[Engine, Path]], logs: Path) -> dict[str, dict]:
    """Per side (empty, full): a first run that also does the hourly purge
    (its last time is forgotten first), then IDLE_REPEATS runs with nothing
    to do.  The two sides take turns run by run, so that the load of other
    jobs on the machine falls on both alike."""
    runs: dict[str, list[Run]] = {label: [] for label in sides}
    first: dict[str, Run] = {}
    for label, (engine, ini) in sides.items():
        with engine.begin() as conn:
            conn.execute(communicator_state.delete().where(
                communicator_state.c.key == 'last_purge_at'))
        first[label] = pcommunicate(ini, logs=logs, label=f'idle-{label}-first')
    for i in range(IDLE_REPEATS):
        for label, (_, ini) in sides.items():
            runs[label].append(pcommunicate(ini, logs=logs, label=f'idle-{label}-{i}'))
    for run in [*first.values(), *(r for each in runs.values() for r in each)]:
        s = run.summary
        if s.get('pushed') or s.get('pulled') or s.get('applied'):
            raise RuntimeError(f'the idle run had something to do: {run.stdout}')
    return {label: {'first': first[label].seconds,
                    'first_inner': first[label].summary.get('seconds', 0.0),
                    'wall': statistics.median(r.seconds for r in each),
                    'cpu': statistics.median(r.cpu for r in each),
                    'inner': statistics.median(r.summary.get('seconds', 0.0) for r in each),
                    'rss': max(r.maxrss_kib for r in each)}
            for label, each in runs.items()}


# -- main ------------------------------------------------------------------------

def git_commit() -> str:
    env = {**os.environ, 'GIT_OPTIONAL_LOCKS': '0'}  # read only, no index refresh
    try:
        commit = subprocess.run(['git', '-C', str(ROOT), 'log', '-1', '--format=%h'],
                                capture_output=True, text=True, env=env).stdout.strip()
        dirty = subprocess.run(['git', '-C', str(ROOT), 'diff', '--quiet', 'HEAD', '--',
                                'pyramid_communicator'], env=env).returncode != 0
    except OSError:
        return 'unknown'
    return commit + (' + uncommitted changes in pyramid_communicator/' if dirty else '')


def source_fingerprint() -> str:
    """A short hash of the package's sources as measured (the working
    tree, committed or not)."""
    digest = hashlib.sha1()
    for path in sorted((ROOT / 'pyramid_communicator').rglob('*.py')):
        digest.update(str(path.relative_to(ROOT)).encode() + b'\0' + path.read_bytes())
    return digest.hexdigest()[:10]


def nproc() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def rate(n: float, seconds: float) -> str:
    return f'{n / seconds:,.0f}/s' if seconds > 0 else '-'


def mib(kib: int | None) -> str:
    return '-' if kib is None else f'{kib / 1024:.0f} MiB'


def clean_up(server, dbs, tmp: Path) -> None:
    """Stop the facade and drop the run's databases; logs and inis stay."""
    if server is not None:
        server.stop()
    dbs.drop_all()
    for path in tmp.glob('*.sqlite*'):
        path.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--db', choices=('sqlite', 'postgresql', 'mysql'), default='sqlite')
    parser.add_argument('--records', type=int, default=20000, metavar='N',
                        help='records pushed, and records pulled (default 20000)')
    parser.add_argument('--idle-messages', type=int, default=1_000_000, metavar='M',
                        help='delivered outbound and applied inbound messages in the '
                             'idle run (default 1000000; 0 skips it)')
    parser.add_argument('--requests', type=int, default=2000, metavar='K',
                        help='requests of each kind for the publish overhead (default 2000)')
    parser.add_argument('--batch-size', type=int, default=1000, metavar='B',
                        help='communicator.batch_size (default 1000)')
    parser.add_argument('--serve-web', nargs=3, metavar=('URL', 'PORT', 'BATCH'),
                        help=argparse.SUPPRESS)  # the publish-overhead server (internal)
    args = parser.parse_args(argv)
    if args.serve_web:
        serve_web(args.serve_web[0], int(args.serve_web[1]), int(args.serve_web[2]))
        return 0
    n, m, batch = args.records, args.idle_messages, args.batch_size

    def terminate(signum, frame):
        raise SystemExit(f'stopped by signal {signum}')
    signal.signal(signal.SIGTERM, terminate)

    tmp = Path(tempfile.mkdtemp(prefix='sync_bench_'))
    logs = tmp / 'logs'
    logs.mkdir()
    dbs = Databases(args.db, tmp)
    server: FacadeServer | None = None
    results: dict[str, object] = {}
    commit = f'{git_commit()} (sources sha1 {source_fingerprint()})'
    results['load_start'] = os.getloadavg()
    say(f'{args.db}: N={n} M={m} batch_size={batch}; logs in {logs}; commit {commit}')
    try:
        central_url, facade_url = dbs.create('central'), dbs.create('facade')
        central, facade = dbs.engine(central_url), dbs.engine(facade_url)
        for engine in (central, facade):
            create_tables(engine)
            raw_metadata.create_all(engine)
        port = free_port()
        facade_ini = write_ini(tmp / 'facade.ini',
                               app_settings(facade_url, 'facade', batch), port)
        server = FacadeServer(facade_ini, port, logs / 'facade.log').start()
        central_ini = write_ini(tmp / 'central.ini', app_settings(
            central_url, 'central', batch, **{'communicator.base_uri': server.url}))

        # 1. push
        say(f'creating {n} tags on central (autopublished, 5000 per transaction)')
        results['publish_setup'] = create_tags(central, 'c', n)
        say(f'push: pcommunicate --push ({n} messages)')
        facade_cpu = cpu_seconds(server.process.pid)
        started = time.perf_counter()
        push = pcommunicate(central_ini, '--push', logs=logs, label='push')
        try:
            wait_until(synced(facade, n, n))
        except RuntimeError as exc:
            raise RuntimeError(f'{exc}; failures: {failed_inbound(facade)}') from None
        results['push'] = time.perf_counter() - started
        results['push_facade_cpu'] = cpu_seconds(server.process.pid) - facade_cpu
        results['push_run'] = push
        if count(central, 'outbound_messages', 'delivered_at IS NULL'):
            raise RuntimeError('central still has undelivered messages after the push')
        say(f'push: {rate(n, results["push"])} ({push.stdout.strip()})')

        # 2. pull
        say(f'creating {n} tags in the facade database (autopublished)')
        create_tags(facade, 'f', n)
        say(f'pull: pcommunicate --pull ({n} messages)')
        facade_cpu = cpu_seconds(server.process.pid)
        started = time.perf_counter()
        pull = pcommunicate(central_ini, '--pull', logs=logs, label='pull')
        try:
            wait_until(synced(central, 2 * n, n), timeout=30)
        except RuntimeError as exc:
            raise RuntimeError(f'{exc}; failures: {failed_inbound(central)}') from None
        results['pull'] = time.perf_counter() - started
        results['pull_facade_cpu'] = cpu_seconds(server.process.pid) - facade_cpu
        results['pull_run'] = pull
        if count(facade, 'outbound_messages', 'delivered_at IS NULL'):
            raise RuntimeError('the facade still serves undelivered messages after the pull')
        say(f'pull: {rate(n, results["pull"])} ({pull.stdout.strip()})')
        results['facade_rss'] = server.peak_rss_kib()

        # 3. raw driver, both directions, same databases
        say('raw driver: the same work, both directions')
        raw_fill(central_url, n, 'rc')
        raw_fill(facade_url, n, 'rf')
        results['raw_push'], moved = raw_transfer(central_url, facade_url, 'central', batch)
        assert moved == n and count(facade, 'bench_raw_tags') == n, moved
        results['raw_pull'], moved = raw_transfer(facade_url, central_url, 'facade', batch)
        assert moved == n and count(central, 'bench_raw_tags') == n, moved
        say(f'raw: {rate(n, results["raw_push"])} central to facade, '
            f'{rate(n, results["raw_pull"])} facade to central')

        # 3b. what no run can go below: start-up, and creating the records
        say('floor: pcommunicate with nothing to do; N tags through the ORM alone')
        results['startup'] = pcommunicate(central_ini, logs=logs, label='startup').seconds
        results['orm_floor'] = orm_floor(central, 'orm', n, batch)

        # 4. publish overhead, in process
        say(f'publish overhead: {args.requests} requests of each kind (WebTest)')
        web_url = dbs.create('web')
        results['overhead'] = publish_overhead(web_url, dbs.engine(web_url), args.requests,
                                               batch)
        say('publish overhead with history: the same on central, which now holds '
            f'{2 * n} synced tags')
        results['overhead_history'] = publish_overhead(central_url, central, args.requests,
                                                       batch)
        say(f'publish overhead over HTTP: {args.requests} requests of each kind (waitress)')
        http_url = dbs.create('http')
        results['overhead_http'] = publish_overhead_http(http_url, dbs.engine(http_url),
                                                         args.requests, batch, logs)

        # 5. idle runs
        if m > 0:
            sides = {}
            for label in ('empty', 'full'):
                url = dbs.create(f'idle{label}')
                engine = dbs.engine(url)
                create_tables(engine)
                sides[label] = (engine, write_ini(tmp / f'idle-{label}.ini', app_settings(
                    url, 'central', batch, **{'communicator.base_uri': server.url})))
            idle = sides['full'][0]
            say(f'idle: filling {m:,} delivered outbound + {m:,} applied inbound messages')
            results['fill'] = fill_history(idle, m)
            if (count(idle, 'outbound_messages', 'delivered_at IS NOT NULL') != m
                    or count(idle, 'inbound_messages', 'processed_at IS NOT NULL') != m):
                raise RuntimeError('the fill did not produce M rows in each queue')
            say(f'idle: filled in {results["fill"]:.1f} s; runs on the empty and the full '
                'database, taking turns')
            idle_results = idle_runs(sides, logs)
            results['idle_empty'], results['idle_full'] = idle_results['empty'], \
                idle_results['full']
            if (count(idle, 'outbound_messages') != m or count(idle, 'inbound_messages') != m):
                raise RuntimeError('the purge deleted filled rows')
        results['facade_rss_end'] = server.peak_rss_kib()
        results['load_end'] = os.getloadavg()
    finally:
        clean_up(server, dbs, tmp)
    report(args, n, m, batch, commit, results)
    return 0


def report(args, n: int, m: int, batch: int, commit: str, r: dict) -> None:
    push_run, pull_run = r['push_run'], r['pull_run']
    o = r['overhead']
    rows = [
        ('setup: create + autopublish on central (ORM, 5000/transaction, untimed for push)',
         rate(n, r['publish_setup'])),
        ('push: pcommunicate --push until applied at the facade',
         f'{rate(n, r["push"])}  ({r["push"]:.1f} s)'),
        ('pull: pcommunicate --pull (pull + apply at central)',
         f'{rate(n, r["pull"])}  ({r["pull"]:.1f} s)'),
        ('  CPU s during push: pcommunicate; facade server',
         f'{push_run.cpu:.1f}; {r["push_facade_cpu"]:.1f}'),
        ('  CPU s during pull: pcommunicate; facade server',
         f'{pull_run.cpu:.1f}; {r["pull_facade_cpu"]:.1f}'),
        ('raw driver, central -> facade', f'{rate(n, r["raw_push"])}  ({r["raw_push"]:.2f} s)'),
        ('raw driver, facade -> central', f'{rate(n, r["raw_pull"])}  ({r["raw_pull"]:.2f} s)'),
        ('push / raw', f'{r["raw_push"] / r["push"]:.3f}'),
        ('pull / raw', f'{r["raw_pull"] / r["pull"]:.3f}'),
        ('floor: pcommunicate with nothing to do (start-up and one exchange)',
         f'{r["startup"]:.2f} s'),
        ('floor: N tags through the ORM alone (no add-on), batch_size per flush',
         f'{rate(n, r["orm_floor"])}  ({r["orm_floor"]:.2f} s)'),
        ('  best ratio with only these two: raw push time / (start-up + ORM)',
         f'{r["raw_push"] / (r["startup"] + r["orm_floor"]):.3f}'),
        ('  the add-on\'s own cost per record, push; pull (wall - floors) / N',
         f'{(r["push"] - r["startup"] - r["orm_floor"]) / n * 1e6:.0f} µs; '
         f'{(r["pull"] - r["startup"] - r["orm_floor"]) / n * 1e6:.0f} µs'),
        ('peak RSS pcommunicate --push', mib(push_run.maxrss_kib)),
        ('peak RSS pcommunicate --pull', mib(pull_run.maxrss_kib)),
        ('peak RSS facade server (VmHWM after push + pull)', mib(r['facade_rss'])),
        (f'publish overhead: POST /tags (autopublish), mean of {o["requests"]}',
         f'{o["synced_ms"]:.2f} ms'),
        (f'  same request, unsynced model, mean of {o["requests"]}', f'{o["plain_ms"]:.2f} ms'),
        ('  ratio synced / unsynced (mean; median)',
         f'{o["ratio"]:.2f}; {o["median_ratio"]:.2f}'),
    ]
    o = r['overhead_history']
    rows += [
        (f'  the same on central after the push and pull ({2 * n:,} tags synced): ratio '
         '(mean; median)', f'{o["ratio"]:.2f}; {o["median_ratio"]:.2f}'),
    ]
    h = r['overhead_http']
    rows += [
        (f'publish overhead over HTTP (waitress, keep-alive), mean of {h["requests"]}',
         f'{h["synced_ms"]:.2f} ms vs {h["plain_ms"]:.2f} ms unsynced'),
        ('  ratio synced / unsynced over HTTP (mean; median)',
         f'{h["ratio"]:.2f}; {h["median_ratio"]:.2f}'),
        ('  server CPU per request, synced vs unsynced; ratio',
         f'{h["synced_cpu_ms"]:.2f} ms vs {h["plain_cpu_ms"]:.2f} ms; {h["cpu_ratio"]:.2f}'),
    ]
    if m > 0:
        e, f = r['idle_empty'], r['idle_full']
        rows += [
            (f'idle: fill {m:,} + {m:,} messages (set-based SQL, untimed)', f'{r["fill"]:.1f} s'),
            (f'idle run, empty db: wall (median of {IDLE_REPEATS}); inside pcommunicate',
             f'{e["wall"]:.2f} s; {e["inner"]:.3f} s'),
            (f'idle run, {m:,} + {m:,} msgs: wall (median of {IDLE_REPEATS}); inside',
             f'{f["wall"]:.2f} s; {f["inner"]:.3f} s'),
            ('idle run CPU s (user + system, median): empty db; full db',
             f'{e["cpu"]:.2f} s; {f["cpu"]:.2f} s'),
            ('  ratio full / empty: wall; CPU; inside',
             f'{f["wall"] / e["wall"]:.2f}; {f["cpu"] / max(e["cpu"], 1e-3):.2f}; '
             f'{f["inner"] / max(e["inner"], 1e-3):.2f}'),
            ('first run incl. hourly purge: empty db; full db (wall)',
             f'{e["first"]:.2f} s; {f["first"]:.2f} s'),
            ('peak RSS pcommunicate idle run (full db)', mib(f['rss'])),
            ('peak RSS facade server (VmHWM at the end)', mib(r['facade_rss_end'])),
        ]
    width = max(len(label) for label, _ in rows)
    print()
    print(f'sync throughput: backend {args.db}, N={n:,} records each way, M={m:,}, '
          f'communicator.batch_size={batch}, nproc={nproc()}, commit {commit}')
    print(f'(communicator.retry_delay=0, communicator.timeout={CLIENT_TIMEOUT}, '
          'retention_days=7 with the idle rows stamped now; records are demo Tags '
          '(autopublish, match_on=name); one run, compare ratios)')
    load = ' -> '.join('/'.join(f'{x:.1f}' for x in r[k]) for k in ('load_start', 'load_end'))
    print(f'load average (1/5/15 min) at start -> end: {load}')
    print('-' * (width + 30))
    for label, value in rows:
        print(f'{label:<{width}}  {value}')
    print('-' * (width + 30))
    print(f'pcommunicate --push: {push_run.stdout.strip()}')
    print(f'pcommunicate --pull: {pull_run.stdout.strip()}')
    command = ['.venv/bin/python', 'benchmarks/sync_throughput.py', '--db', args.db,
               '--records', str(n), '--idle-messages', str(m), '--requests',
               str(args.requests), '--batch-size', str(batch)]
    print(f'reproduce (from {ROOT}): {shlex.join(command)}')


if __name__ == '__main__':
    sys.exit(main())
