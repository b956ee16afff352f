"""One ``pcommunicate`` run at a time per database, whatever host it runs on.

The lock lives in the database: a session-level advisory lock on
PostgreSQL, ``GET_LOCK`` on MariaDB/MySQL.  Both belong to a connection,
so a run killed with ``kill -9`` frees the lock the moment the server sees
the connection drop; there is no lease to expire.  SQLite is a file on one
host, so there the lock is an ``flock`` on a file beside the database.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import time
import zlib
from collections.abc import Iterator

from sqlalchemy import text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.2


def _lock_key(name: str) -> int:
    return zlib.crc32(f'pyramid_communicator:{name}'.encode())


def _until(wait: float) -> Iterator[None]:
    """Yield once, then again every poll interval until ``wait`` passes."""
    deadline = time.monotonic() + wait
    yield
    while time.monotonic() < deadline:
        time.sleep(_POLL_SECONDS)
        yield


@contextlib.contextmanager
def _postgresql(engine: Engine, name: str, wait: float) -> Iterator[bool]:
    key = _lock_key(name)
    with engine.connect().execution_options(isolation_level='AUTOCOMMIT') as conn:
        acquired = any(conn.execute(text('SELECT pg_try_advisory_lock(:k)'), {'k': key}).scalar()
                       for _ in _until(wait))
        try:
            yield acquired
        finally:
            if acquired:
                conn.execute(text('SELECT pg_advisory_unlock(:k)'), {'k': key})


def _mysql_lock_name(database: str | None, name: str) -> str:
    """``GET_LOCK`` names are server-wide, not per database: include the
    database so that two deployments (or test runs) sharing a server do not
    lock each other out.  Names longer than MySQL's 64 characters are hashed."""
    lock_name = f'pyramid_communicator.{database}.{name}'
    if len(lock_name) > 64:
        digest = hashlib.sha1(lock_name.encode()).hexdigest()
        lock_name = f'pyramid_communicator.{digest}'
    return lock_name


@contextlib.contextmanager
def _mysql(engine: Engine, name: str, wait: float) -> Iterator[bool]:
    with engine.connect() as conn:
        lock_name = _mysql_lock_name(conn.execute(text('SELECT DATABASE()')).scalar(), name)
        acquired = conn.execute(text('SELECT GET_LOCK(:n, :t)'),
                                {'n': lock_name, 't': int(wait)}).scalar() == 1
        try:
            yield acquired
        finally:
            if acquired:
                conn.execute(text('SELECT RELEASE_LOCK(:n)'), {'n': lock_name})


@contextlib.contextmanager
def _sqlite(engine: Engine, name: str, wait: float) -> Iterator[bool]:
    database = engine.url.database
    if not database or database == ':memory:':
        yield True  # a private in-memory database: nobody to compete with
        return
    path = os.path.abspath(database) + '.communicator-lock'
    with open(path, 'a+') as handle:
        acquired = False
        for _ in _until(wait):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            acquired = True
            break
        try:
            yield acquired
        finally:
            if acquired:
                fcntl.flock(handle, fcntl.LOCK_UN)


_BY_DIALECT = {'postgresql': _postgresql, 'mysql': _mysql, 'mariadb': _mysql,
               'sqlite': _sqlite}


@contextlib.contextmanager
def run_lock(engine: Engine, name: str, wait: float = 0) -> Iterator[bool]:
    """Hold the run lock of app ``name`` for the ``with`` block.

    Yields False, without waiting longer than ``wait`` seconds, when
    another run holds it.
    """
    lock = _BY_DIALECT.get(engine.dialect.name)
    if lock is None:
        log.warning('no run lock on %s; overlapping runs stay correct but '
                    'may send messages twice', engine.dialect.name)
        yield True
        return
    with lock(engine, name, wait) as acquired:
        yield acquired
