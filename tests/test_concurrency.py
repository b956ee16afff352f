"""Concurrency with real processes, real HTTP and real databases.

Late commits (an id taken before a later one but committed after it),
overlapping ``pcommunicate`` runs, the same batch POSTed several times at
once, a facade served by several processes and threads while clients
write and central syncs, and pairs of apps on different databases.  The
claim under test is always the same: every message arrives exactly once.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
from conftest import (
    BIN,
    PASSWORD,
    USERNAME,
    Central,
    Server,
    Side,
    app_settings,
    free_port,
    versioned,
    write_ini,
)
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post, get_engine
from pyramid_communicator.locking import run_lock

SUMMARY = re.compile(r'pushed=(\d+) pulled=(\d+) applied=(\d+) failed=(\d+) waiting=(\d+)')
LOCKED_LINE = 'another pcommunicate run holds the lock'


# -- helpers ------------------------------------------------------------------

def summary(stdout: str) -> dict[str, int]:
    """The numbers of pcommunicate's summary line, which is what an operator reads."""
    match = SUMMARY.search(stdout)
    assert match, f'no summary line in {stdout!r}'
    return dict(zip(('pushed', 'pulled', 'applied', 'failed', 'waiting'),
                    map(int, match.groups()), strict=True))


def titles(side: Side) -> list[str]:
    return sorted(row['title'] for row in side.rows('posts'))


def create_posts(engine: Engine, names: list[str]) -> list[int]:
    """Posts written and published in one transaction, as a host app's view would."""
    with Session(engine) as session, session.begin():
        posts = [Post(title=name, body=f'body of {name}') for name in names]
        session.add_all(posts)
        session.flush()
        for post in posts:
            publish(session, post)
        return [post.id for post in posts]


@contextlib.contextmanager
def held_publish(engine: Engine, title: str) -> Iterator[tuple[Session, int]]:
    """A post published in a transaction that stays open: its outbound id is
    taken but invisible to everyone else until the block commits."""
    session = Session(engine)
    try:
        post = Post(title=title, body='committed late')
        session.add(post)
        session.flush()
        message = publish(session, post)
        session.flush()
        yield session, message.id
    finally:
        session.close()  # rolls back unless the block committed


def outbound_id_of(side: Side, post_id: int) -> int:
    with side.engine.connect() as conn:
        return conn.execute(
            text('SELECT id FROM outbound_messages WHERE original_id = :p'), {'p': post_id}
        ).scalar_one()


def assert_each_once(side: Side, expected: list[str]) -> None:
    """Every expected title is a post exactly once (no loss, no duplicate)."""
    found = titles(side)
    counts = {name: found.count(name) for name in expected}
    assert [name for name, n in counts.items() if n != 1] == [], counts
    assert len(found) == len(expected), sorted(set(found) - set(expected))


def assert_clean_queues(side: Side) -> None:
    """Everything sent was acknowledged; everything received was stored once,
    applied on the first attempt, and nothing failed."""
    assert side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert side.count('inbound_messages', 'processed_at IS NULL') == 0
    assert side.count('inbound_messages', 'attempts <> 1 OR last_error IS NOT NULL') == 0
    with side.engine.connect() as conn:
        duplicates = conn.execute(text(
            'SELECT COUNT(*) FROM (SELECT sender, remote_id FROM inbound_messages '
            'GROUP BY sender, remote_id HAVING COUNT(*) > 1) d')).scalar()
    assert duplicates == 0


def sync_until_quiet(central: Central, limit: int = 5) -> None:
    """Run pcommunicate until a run moves nothing; one run drains both
    queues, so two must be enough when nobody writes any more."""
    for _ in range(limit):
        figures = summary(central.sync())
        assert figures['failed'] == 0, figures
        if figures['pushed'] == figures['pulled'] == figures['applied'] == 0:
            return
    pytest.fail(f'still moving messages after {limit} runs')


# -- fixtures -------------------------------------------------------------------

@pytest.fixture
def app_engine() -> Iterator[Callable[[Side], Engine]]:
    """An engine configured the way the demo app configures its own (WAL and a
    busy timeout on SQLite), for writes that compete with the servers."""
    engines: list[Engine] = []

    def make(side: Side) -> Engine:
        engine = get_engine({'sqlalchemy.url': side.url})
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Subprocesses a test starts; whatever still runs is killed afterwards."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.fixture
def serve_facade(tmp_path, make_side, processes):
    """``serve_facade(kind)``: the facade served by ``waitress`` with 8
    threads or ``gunicorn`` with 3 worker processes."""
    servers: list[Server] = []

    def start(kind: str, side: Side | None = None) -> Server:
        side = side or make_side('facade')
        port = free_port()
        if kind == 'waitress':
            ini = write_ini(tmp_path / 'facade.ini', app_settings(side), port, threads=8)
            server = Server(side, ini, port, tmp_path / 'facade.log')
            servers.append(server)
            return server.start()
        ini = write_ini(tmp_path / 'facade.ini', app_settings(side))
        server = Server(side, ini, port, tmp_path / 'facade.log')
        server.process = subprocess.Popen(
            [str(BIN / 'gunicorn'), '--paste', str(ini), '-w', '3',
             '-b', f'127.0.0.1:{port}', '--graceful-timeout', '5'],
            stdout=server.log.open('ab'), stderr=subprocess.STDOUT)
        processes.append(server.process)
        servers.append(server)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert server.process.poll() is None, server.log.read_text()[-2000:]
            try:
                requests.get(server.url + '/posts', timeout=5)
                return server
            except requests.RequestException:  # not listening, or workers still booting
                time.sleep(0.02)
        raise RuntimeError('gunicorn did not start within 30 seconds')
    yield start
    for server in servers:
        server.stop()


def central_ini(tmp_path: Path, side: Side, base_uri: str, label: str, **settings) -> Central:
    """A second ini for the same central database (make_central has one path)."""
    values = app_settings(side, **{'communicator.base_uri': base_uri, **settings})
    return Central(side, write_ini(tmp_path / f'{label}.ini', values))


# -- 1. ids that commit out of order ------------------------------------------------

@pytest.mark.backends('postgresql', 'mysql')
def test_pull_fetches_a_message_that_committed_after_a_later_one(pair, app_engine):
    """The gem's bug: a pull cursor at "highest id seen" skips an id that
    commits after a higher one.  Here id N commits after N+1 was pulled."""
    central, facade = pair
    with held_publish(app_engine(facade.side), 'held at the facade') as (held, held_id):
        later = facade.create_post(title='committed first')
        later_id = outbound_id_of(facade.side, later['id'])
        assert held_id < later_id, 'the held message must have the lower id'

        assert summary(central.sync())['pulled'] == 1
        assert titles(central.side) == ['committed first']
        held.commit()

    assert summary(central.sync())['pulled'] == 1
    assert_each_once(central.side, ['committed first', 'held at the facade'])
    assert_clean_queues(central.side)
    assert_clean_queues(facade.side)


@pytest.mark.backends('postgresql', 'mysql')
def test_push_sends_a_message_that_committed_after_a_later_one(pair, app_engine):
    """The same late commit in central's own outbound queue."""
    central, facade = pair
    engine = app_engine(central.side)
    with held_publish(engine, 'held at central') as (held, held_id):
        later_post, = create_posts(engine, ['committed first'])
        assert held_id < outbound_id_of(central.side, later_post)

        assert summary(central.sync())['pushed'] == 1
        assert titles(facade.side) == ['committed first']
        held.commit()

    assert summary(central.sync())['pushed'] == 1
    assert_each_once(facade.side, ['committed first', 'held at central'])
    assert_clean_queues(central.side)
    assert_clean_queues(facade.side)


# -- 2. overlapping runs ----------------------------------------------------------

def test_a_run_that_finds_the_lock_held_does_nothing(pair, app_engine):
    central, facade = pair
    create_posts(app_engine(central.side), ['from central'])
    facade.create_post(title='from the facade')

    with run_lock(central.side.engine, 'central') as acquired:
        assert acquired
        result = central.pcommunicate()
        assert result.returncode == 0, result.stdout + result.stderr
        assert LOCKED_LINE in result.stdout
        assert not SUMMARY.search(result.stdout)

    assert titles(facade.side) == ['from the facade']
    assert titles(central.side) == ['from central']
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1
    assert facade.side.count('outbound_messages', 'delivered_at IS NULL') == 1

    assert summary(central.sync()) == dict(pushed=1, pulled=1, applied=1, failed=0, waiting=0)
    assert_each_once(facade.side, ['from central', 'from the facade'])
    assert_each_once(central.side, ['from central', 'from the facade'])


def _is_waiting_for_lock(side: Side, process: subprocess.Popen) -> bool:
    """Has the run visibly tried the lock we hold (and so must be waiting)?"""
    if side.engine.dialect.name == 'postgresql':
        # A connection that tried the advisory lock (its last query) and holds none.
        query = ("SELECT COUNT(*) FROM pg_stat_activity a WHERE a.datname = current_database() "
                 "AND a.pid <> pg_backend_pid() AND a.query LIKE '%pg_try_advisory_lock%' "
                 "AND NOT EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid "
                 "AND l.locktype = 'advisory')")
    elif side.engine.dialect.name in ('mysql', 'mariadb'):
        # GET_LOCK blocks in the server while it waits.
        query = ("SELECT COUNT(*) FROM information_schema.processlist "
                 "WHERE id <> CONNECTION_ID() AND db = DATABASE() "
                 "AND info LIKE 'SELECT GET_LOCK%'")
    else:  # flock: the run has opened the lock file and polls it
        lock_file = os.path.abspath(side.engine.url.database) + '.communicator-lock'
        fds = Path(f'/proc/{process.pid}/fd')
        with contextlib.suppress(OSError):
            return any(os.readlink(fd) == lock_file for fd in fds.iterdir())
        return False
    with side.engine.connect() as conn:
        return conn.execute(text(query)).scalar() > 0


def test_a_run_with_lock_wait_queues_up_behind_the_holder(pair, app_engine, tmp_path,
                                                           processes):
    central, facade = pair
    create_posts(app_engine(central.side), ['from central'])
    waiting = central_ini(tmp_path, central.side, facade.url, 'central-wait',
                          **{'communicator.lock_wait': 60})

    with run_lock(central.side.engine, 'central') as acquired:
        assert acquired
        process = subprocess.Popen([str(BIN / 'pcommunicate'), str(waiting.ini)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        processes.append(process)
        for _ in range(300):  # 30 seconds at most
            if process.poll() is not None or _is_waiting_for_lock(central.side, process):
                break
            time.sleep(0.1)
        assert process.poll() is None, process.communicate()
        assert _is_waiting_for_lock(central.side, process)
        assert titles(facade.side) == []

    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stdout + stderr
    assert LOCKED_LINE not in stdout
    assert summary(stdout)['pushed'] == 1
    assert_each_once(facade.side, ['from central'])


def test_a_lock_held_on_another_database_does_not_block(pair, make_side, app_engine):
    """The lock belongs to one database: another deployment (or test run)
    on the same server with an app of the same name runs independently."""
    central, facade = pair
    other = make_side('other_central')
    create_posts(app_engine(central.side), ['from central'])
    with run_lock(other.engine, 'central') as acquired:
        assert acquired
        output = central.sync()
    assert LOCKED_LINE not in output
    assert summary(output)['pushed'] == 1
    assert_each_once(facade.side, ['from central'])


def test_overlapping_runs_move_every_message_exactly_once(pair, app_engine, tmp_path,
                                                          processes):
    """Four runs started at once, two that give up on the lock and two that
    wait for it, with several batches to move in both directions."""
    central, facade = pair
    count = 100
    from_central = [f'central {i}' for i in range(count)]
    from_facade = [f'facade {i}' for i in range(count)]
    create_posts(app_engine(central.side), from_central)
    create_posts(app_engine(facade.side), from_facade)
    # Small batches: each run makes many requests and transactions to overlap.
    at_once = central_ini(tmp_path, central.side, facade.url, 'central-at-once',
                          **{'communicator.batch_size': 15})
    waiting = central_ini(tmp_path, central.side, facade.url, 'central-wait',
                          **{'communicator.batch_size': 15, 'communicator.lock_wait': 120})

    runs = [subprocess.Popen([str(BIN / 'pcommunicate'), str(ini)], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for ini in (at_once.ini, waiting.ini, at_once.ini, waiting.ini)]
    processes.extend(runs)
    outputs = [run.communicate(timeout=120) for run in runs]

    for run, (stdout, stderr) in zip(runs, outputs, strict=True):
        assert run.returncode == 0, stdout + stderr
    figures = [summary(stdout) for stdout, _ in outputs if LOCKED_LINE not in stdout]
    assert len(figures) >= 2  # at least the two that wait do the work or find none
    assert sum(f['pushed'] for f in figures) == count  # nothing sent twice
    assert sum(f['pulled'] for f in figures) == count
    assert sum(f['applied'] for f in figures) == count
    assert sum(f['failed'] for f in figures) == 0

    everything = from_central + from_facade
    assert_each_once(central.side, everything)
    assert_each_once(facade.side, everything)
    assert central.side.count('inbound_messages') == count
    assert facade.side.count('inbound_messages') == count
    assert_clean_queues(central.side)
    assert_clean_queues(facade.side)


# -- 3. the same batch POSTed several times at once ---------------------------------

def post_batch(url: str, payload: bytes, barrier: threading.Barrier,
               statuses: list[int | str]) -> None:
    """POST as central's client does, released together with the other
    senders so that the requests really overlap at the server."""
    barrier.wait(timeout=30)
    try:
        response = requests.post(
            url + '/messages.json', data=payload, timeout=30, auth=(USERNAME, PASSWORD),
            headers={'X-Communicator-Name': 'central', 'Content-Type': 'application/json'})
        statuses.append(response.status_code)
    except requests.RequestException as exc:
        statuses.append(repr(exc))


def test_the_same_batch_posted_at_once_is_stored_and_applied_once(serve_facade):
    facade = serve_facade('waitress')
    senders = 6
    size = 0
    for round_ in range(3):  # fresh races on a queue that already has rows
        batch = [versioned({'id': size + i, 'origin': 'central', 'original_id': size + i,
                            'body': json.dumps({'post': {'title': f'batch {size + i}',
                                                         'body': 'x'}})}, 'central')
                 for i in range(1, 31)]
        size += len(batch)
        payload = json.dumps(batch).encode()
        barrier = threading.Barrier(senders)
        statuses: list[int | str] = []
        args = (facade.url, payload, barrier, statuses)
        threads = [threading.Thread(target=post_batch, args=args) for _ in range(senders)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert statuses == [202] * senders, (round_, statuses)

    assert_each_once(facade.side, [f'batch {i}' for i in range(1, size + 1)])
    assert facade.side.count('inbound_messages') == size
    assert facade.side.count('communicator_mappings', "origin <> ''") == size
    assert facade.side.count('outbound_messages') == 0  # applied, never echoed
    assert_clean_queues(facade.side)


# -- 4. many writers while central syncs -------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize('server', ['gunicorn', 'waitress'])
def test_many_writers_while_central_syncs(server, serve_facade, make_side, make_central,
                                          app_engine):
    facade = serve_facade(server)
    central = make_central(make_side('central'), facade.url)
    central_engine = app_engine(central.side)
    writers, per_writer, central_count = 4, 10, 30
    errors: list[str] = []

    def facade_writer(number: int) -> None:
        with requests.Session() as http:
            for i in range(per_writer):
                try:
                    response = http.post(facade.url + '/posts', timeout=30,
                                         json={'title': f'facade {number}.{i}'})
                    if response.status_code != 200:
                        errors.append(f'facade {number}.{i}: HTTP {response.status_code}')
                except requests.RequestException as exc:
                    errors.append(f'facade {number}.{i}: {exc!r}')

    def central_writer() -> None:
        for i in range(central_count):
            try:
                create_posts(central_engine, [f'central {i}'])
            except Exception as exc:  # reported below, with the others
                errors.append(f'central {i}: {exc!r}')

    threads = [threading.Thread(target=facade_writer, args=(n,)) for n in range(writers)]
    threads.append(threading.Thread(target=central_writer))
    for thread in threads:
        thread.start()
    runs = 0
    while any(thread.is_alive() for thread in threads) and runs < 30:
        assert summary(central.sync())['failed'] == 0
        runs += 1
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert runs >= 1

    sync_until_quiet(central)
    everything = ([f'facade {n}.{i}' for n in range(writers) for i in range(per_writer)]
                  + [f'central {i}' for i in range(central_count)])
    assert_each_once(central.side, everything)
    assert_each_once(facade.side, everything)
    assert_clean_queues(central.side)
    assert_clean_queues(facade.side)


# -- 5. mixed pairs -----------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.backends('sqlite')  # the pairs pick their own backends: once per run
@pytest.mark.parametrize('central_db, facade_db', [
    ('postgresql', 'sqlite'), ('sqlite', 'postgresql'), ('mysql', 'sqlite'),
])
def test_mixed_pair_syncs_both_ways(central_db, facade_db, make_side, serve, make_central,
                                    app_engine):
    """Each side keeps its own database; what crosses is JSON, so types
    (timestamps here) must survive a change of database on the way."""
    facade = serve(make_side('facade', backend=facade_db))
    central = make_central(make_side('central', backend=central_db), facade.url)
    create_posts(app_engine(central.side), ['from central'])
    facade.create_post(title='from the facade', body='written online',
                       published_on='2024-02-29T23:59:58')

    assert summary(central.sync()) == dict(pushed=1, pulled=1, applied=1, failed=0, waiting=0)
    assert_each_once(central.side, ['from central', 'from the facade'])
    assert_each_once(facade.side, ['from central', 'from the facade'])
    with Session(app_engine(central.side)) as session:
        arrived = session.query(Post).filter_by(title='from the facade').one()
        assert arrived.body == 'written online'
        assert arrived.published_on == datetime.datetime(2024, 2, 29, 23, 59, 58)

    copy = next(row for row in facade.side.rows('posts') if row['title'] == 'from central')
    facade.update_post(copy['id'], body='edited on the facade')
    assert summary(central.sync()) == dict(pushed=0, pulled=1, applied=1, failed=0, waiting=0)
    assert [row['body'] for row in central.side.rows('posts')
            if row['title'] == 'from central'] == ['edited on the facade']
    assert_each_once(central.side, ['from central', 'from the facade'])
    assert_clean_queues(central.side)
    assert_clean_queues(facade.side)

