"""Fixtures: fresh databases on the chosen backend, the demo app in
process (WebTest) and served for real (waitress), and ``pcommunicate``
run as a subprocess.

Choose the backend with ``--db sqlite|postgresql|mysql`` or the
environment variable ``COMMUNICATOR_TEST_DB``.  Server URLs come from
``COMMUNICATOR_TEST_PG_URL`` and ``COMMUNICATOR_TEST_MYSQL_URL``.  Every
run creates databases of its own (dropped at the end), and every test
gets empty tables.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import transaction
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session

from pyramid_communicator.demo import create_tables
from pyramid_communicator.demo.models import Base as DemoBase
from pyramid_communicator.models import metadata as communicator_metadata

SERVER_URLS = {
    'postgresql': os.environ.get('COMMUNICATOR_TEST_PG_URL',
                                 'postgresql+psycopg://postgres@127.0.0.1:5432/test'),
    'mysql': os.environ.get('COMMUNICATOR_TEST_MYSQL_URL',
                            'mysql+pymysql://root@127.0.0.1:3306/test'),
}
BACKENDS = ('sqlite', 'postgresql', 'mysql')
BIN = Path(sys.executable).parent
USERNAME, PASSWORD = 'communicator', 's3cret-pass'


def pytest_addoption(parser):
    parser.addoption('--db', default=os.environ.get('COMMUNICATOR_TEST_DB', 'sqlite'),
                     choices=BACKENDS, help='database backend for the tests')
    parser.addoption('--matrix-all', action='store_true',
                     help='test_matrix: run every pair of backends, whatever --db says '
                          '(benchmarks/matrix_report.py)')


#: The fault harness's seed for the run (see ``pytest_configure``).
FAULT_SEED = pytest.StashKey[int]()
#: The ``user_properties`` entry of a fault scenario's report: ``(name, json)``.
FAULT_RESULT = 'communicator_fault_result'


def pytest_configure(config):
    config.addinivalue_line('markers', 'faults: the reliability harness (kills, proxies); slow too')
    config.addinivalue_line('markers', 'slow: left out of the default run; select with -m slow')
    config.addinivalue_line('markers', 'backends(*names): only run on these backends')
    workerinput = getattr(config, 'workerinput', None)
    if workerinput is not None:  # a pytest-xdist worker: the main process chose
        config.stash[FAULT_SEED] = workerinput['communicator_fault_seed']
    else:
        from faults.harness import fault_seed
        config.stash[FAULT_SEED] = fault_seed()
        config.pluginmanager.register(FaultTable(config), 'communicator-fault-table')


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: every worker runs its scenarios with the run's one seed."""
    node.workerinput['communicator_fault_seed'] = node.config.stash[FAULT_SEED]


class FaultTable:
    """The fault harness's table, made in pytest's main process from the
    scenarios' reports (they arrive there from pytest-xdist workers too):
    in the terminal summary and in ``faults-table-<backend>.txt`` under
    pytest's base temporary directory."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.results: list[tuple[str, str]] = []
        self.table: str | None = None
        self.path: Path | None = None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == 'call':
            self.results += [value for key, value in report.user_properties
                             if key == FAULT_RESULT]

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if not self.results:
            return
        from faults.harness import SCENARIOS, ScenarioResult, format_notes, format_table
        order = list(SCENARIOS)
        results = [ScenarioResult.from_json(raw) for name, raw in
                   sorted(self.results, key=lambda entry: order.index(entry[0]))]
        backend = self.config.getoption('--db')
        self.table = (format_table(results, backend, self.config.stash[FAULT_SEED])
                      + '\n\n' + format_notes(results))
        basetemp = self.config._tmp_path_factory.getbasetemp()
        self.path = basetemp / f'faults-table-{backend}.txt'
        self.path.write_text(self.table + '\n')

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.table is None:
            return
        terminalreporter.section('fault harness')
        for line in self.table.splitlines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f'(also in {self.path})')


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects: ``faults`` must be ``slow`` by then
def pytest_collection_modifyitems(config, items):
    backend = config.getoption('--db')
    for item in items:
        if item.get_closest_marker('faults') is not None:
            item.add_marker(pytest.mark.slow)
        marker = item.get_closest_marker('backends')
        if marker is not None and backend not in marker.args:
            item.add_marker(pytest.mark.skip(reason=f'not for --db {backend}'))


class Databases:
    """Creates databases for this run on one backend and empties them per test."""

    def __init__(self, backend: str, tmp: Path) -> None:
        self.backend = backend
        self.tmp = tmp
        self.run_id = uuid.uuid4().hex[:8]
        self.urls: dict[str, str] = {}
        self.engines: dict[str, Engine] = {}

    def url(self, label: str, backend: str | None = None) -> str:
        backend = backend or self.backend
        key = f'{backend}:{label}'
        if key not in self.urls:
            self.urls[key] = self._create(backend, label)
        return self.urls[key]

    def _create(self, backend: str, label: str) -> str:
        if backend == 'sqlite':
            return f'sqlite:///{self.tmp / (label + ".sqlite")}'
        server = make_url(SERVER_URLS[backend])
        name = f'pc_{self.run_id}_{label}'
        admin = create_engine(server, isolation_level='AUTOCOMMIT')
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE {name}'))
        admin.dispose()
        return server.set(database=name).render_as_string(hide_password=False)

    def engine(self, url: str) -> Engine:
        if url not in self.engines:
            self.engines[url] = create_engine(url)
        return self.engines[url]

    def reset(self, url: str) -> Engine:
        """Empty tables for a test: drop and create ours and the demo's."""
        engine = self.engine(url)
        engine.dispose()
        if url.startswith('sqlite'):
            path = Path(make_url(url).database)
            for suffix in ('', '-wal', '-shm', '.communicator-lock'):
                Path(str(path) + suffix).unlink(missing_ok=True)
        else:
            DemoBase.metadata.drop_all(engine)
            communicator_metadata.drop_all(engine)
        create_tables(engine)
        return engine

    def drop_all(self) -> None:
        for engine in self.engines.values():
            engine.dispose()
        for key, url in self.urls.items():
            backend = key.split(':')[0]
            if backend == 'sqlite':
                continue
            admin = create_engine(SERVER_URLS[backend], isolation_level='AUTOCOMMIT')
            name = make_url(url).database
            with admin.connect() as conn:
                force = ' WITH (FORCE)' if backend == 'postgresql' else ''
                conn.execute(text(f'DROP DATABASE IF EXISTS {name}{force}'))
            admin.dispose()


@pytest.fixture(scope='session')
def backend(pytestconfig) -> str:
    return pytestconfig.getoption('--db')


@pytest.fixture(scope='session')
def databases(backend, tmp_path_factory) -> Iterator[Databases]:
    dbs = Databases(backend, tmp_path_factory.mktemp('databases'))
    yield dbs
    dbs.drop_all()


class Side:
    """One app's database, seen directly (not through the app)."""

    def __init__(self, name: str, url: str, engine: Engine) -> None:
        self.name = name
        self.url = url
        self.engine = engine

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction that commits at the end of the block."""
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=self.engine)
        import zope.sqlalchemy
        zope.sqlalchemy.register(session, transaction_manager=tm)
        with tm:
            yield session
        session.close()

    def rows(self, table: str, order_by: str = 'id') -> list[dict]:
        with self.engine.connect() as conn:
            result = conn.execute(text(f'SELECT * FROM {table} ORDER BY {order_by}'))
            return [dict(row._mapping) for row in result]

    def count(self, table: str, where: str = '1=1') -> int:
        with self.engine.connect() as conn:
            return conn.execute(text(f'SELECT COUNT(*) FROM {table} WHERE {where}')).scalar()


@pytest.fixture
def make_side(databases) -> Callable[..., Side]:
    """``make_side('central')``: a fresh database for an app of that name;
    ``backend=`` picks another backend than the run's (mixed pairs)."""
    def make(name: str, backend: str | None = None) -> Side:
        url = databases.url(name, backend)
        return Side(name, url, databases.reset(url))
    return make


def versioned(message: dict[str, Any], app: str) -> dict[str, Any]:
    """A wire message (a dict) with the version our apps send: a fresh edit
    by ``app`` of every attribute in its body."""
    from pyramid_communicator.versions import now_hlc
    hlc = now_hlc()
    (_, attributes), = json.loads(message['body']).items()
    return {**message, 'version': {'clock': {app: hlc},
                                   'stamps': {key: [hlc, app] for key in attributes}}}


def app_settings(side: Side, **overrides) -> dict[str, str]:
    settings = {
        'sqlalchemy.url': side.url,
        'communicator.name': side.name,
        'communicator.username': USERNAME,
        'communicator.password': PASSWORD,
        'communicator.batch_size': '50',
        'communicator.timeout': '10',
        'communicator.retry_delay': '0',  # retry failures on the very next run
    }
    settings.update({k: str(v) for k, v in overrides.items() if v is not None})
    for key in [k for k, v in overrides.items() if v is None]:
        settings.pop(key, None)
    return settings


@pytest.fixture
def webapp(make_side):
    """``webapp(side, **settings)``: the demo app in process, under WebTest."""
    from webtest import TestApp

    from pyramid_communicator.demo import main
    apps = []

    def make(side: Side, **overrides) -> TestApp:
        app = TestApp(main({}, **app_settings(side, **overrides)))
        apps.append(app)
        return app
    yield make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def write_ini(path: Path, settings: dict[str, str], port: int | None = None,
              server: str = 'waitress', threads: int = 4) -> Path:
    lines = ['[app:main]', 'use = egg:pyramid_communicator#demo']
    lines += [f'{key} = {value}' for key, value in settings.items()]
    if port is not None:
        if server == 'waitress':
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


class Server:
    """The demo app served for real by ``pserve`` (waitress) on loopback."""

    def __init__(self, side: Side, ini: Path, port: int, log: Path) -> None:
        self.side = side
        self.ini = ini
        self.port = port
        self.url = f'http://127.0.0.1:{port}'
        self.log = log
        self.process: subprocess.Popen | None = None

    def start(self) -> Server:
        self.process = subprocess.Popen(
            [str(BIN / 'pserve'), str(self.ini)],
            stdout=self.log.open('ab'), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f'server exited: {self.log.read_text()[-2000:]}')
            try:
                requests.get(self.url + '/posts', timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.02)
        raise RuntimeError('server did not start within 30 seconds')

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    # the demo app's own JSON views
    def create_post(self, **fields) -> dict:
        response = requests.post(self.url + '/posts', json=fields, timeout=10)
        response.raise_for_status()
        return response.json()

    def update_post(self, post_id: int, **fields) -> dict:
        response = requests.post(f'{self.url}/posts/{post_id}', json=fields, timeout=10)
        response.raise_for_status()
        return response.json()


class Central:
    """The central app: an ini file and ``pcommunicate`` as a subprocess."""

    def __init__(self, side: Side, ini: Path) -> None:
        self.side = side
        self.ini = ini

    def pcommunicate(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / 'pcommunicate'), str(self.ini), *args],
                              capture_output=True, text=True, timeout=timeout)

    def sync(self, *args: str) -> str:
        """Run pcommunicate and insist that it succeeded."""
        result = self.pcommunicate(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


@pytest.fixture
def serve(tmp_path):
    """``serve(side, **settings)``: a started Server; stopped after the test."""
    servers = []

    def start(side: Side, **overrides) -> Server:
        port = free_port()
        ini = write_ini(tmp_path / f'{side.name}.ini', app_settings(side, **overrides), port)
        server = Server(side, ini, port, tmp_path / f'{side.name}.log')
        servers.append(server)
        return server.start()
    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def make_central(tmp_path):
    def make(side: Side, base_uri: str | None, **overrides) -> Central:
        ini = write_ini(tmp_path / f'{side.name}.ini',
                        app_settings(side, **{'communicator.base_uri': base_uri, **overrides}))
        return Central(side, ini)
    return make


@pytest.fixture
def pair(make_side, serve, make_central):
    """A facade served on loopback and a central app pointed at it."""
    facade = serve(make_side('facade'))
    central = make_central(make_side('central'), facade.url)
    return central, facade
