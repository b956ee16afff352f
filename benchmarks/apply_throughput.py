"""How fast received messages are applied, next to what the database does
for plain row inserts: ``python benchmarks/apply_throughput.py [URL] [N]``.

Three kinds of messages are applied: creates in the gem's format (no
version), creates with versions, and versioned updates of those records
that conflict with local edits (so every one merges and records
conflicts).  Each prints its cost per message in milliseconds.

Prints ratios from one run (timings on a shared machine are noisy; compare
ratios, not seconds).  URL defaults to a SQLite file in a temporary
directory; the tables of the demo app and the add-on are created in that
database and dropped afterwards, so point it at a scratch database.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time

import transaction
from sqlalchemy import create_engine, text

from pyramid_communicator.demo import create_tables
from pyramid_communicator.demo.models import Base
from pyramid_communicator.models import metadata
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import apply_inbound, make_session
from pyramid_communicator.wire import WireMessage


def _messages(first_id: int, count: int, versioned: bool, hlc: int,
              title: str) -> list[WireMessage]:
    version = None
    if versioned:
        version = {'clock': {'central': hlc},
                   'stamps': {'title': [hlc, 'central'], 'body': [hlc, 'central']}}
    return [WireMessage(first_id + i, json.dumps({'post': {'title': f'{title}{i}', 'body': 'b'}}),
                        'central', i + 1, None, version) for i in range(count)]


def _apply(engine, settings, messages) -> float:
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    with tm:
        store_inbound(session, 'central', messages)
    session.close()
    started = time.perf_counter()
    result = apply_inbound(engine, settings)
    seconds = time.perf_counter() - started
    assert result.applied == len(messages), result
    return seconds


def _edit_locally(engine) -> None:
    """Local edits that the versioned updates conflict with."""
    from pyramid_communicator import publish
    from pyramid_communicator.demo.models import Post
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    session.info.clear()  # a host session: publishing stamps local edits
    with tm:
        for post in session.query(Post):
            post.body = 'edited here'
            publish(session, post)
    session.close()


def main(url: str, count: int) -> None:
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    metadata.drop_all(engine)
    create_tables(engine)
    settings = parse_settings({'communicator.name': 'facade',
                               'communicator.username': 'u',
                               'communicator.password': 'p',
                               # the first kind is the gem's: no versions
                               'communicator.gem_peer': 'true'})
    hlc = time.time_ns() // 1000 - 10 ** 9  # older than the local edits
    try:
        gem = _apply(engine, settings, _messages(1, count, False, 0, 'g'))
        with engine.begin() as conn:
            conn.execute(text('DELETE FROM posts'))
            conn.execute(text('DELETE FROM communicator_mappings'))
        created = _apply(engine, settings, _messages(count + 1, count, True, hlc, 'v'))
        _edit_locally(engine)
        updated = _apply(engine, settings, _messages(2 * count + 1, count, True, hlc + 1, 'u'))

        with engine.begin() as conn:
            conn.execute(text('DELETE FROM posts'))
        started = time.perf_counter()
        for first in range(0, count, settings.batch_size):
            with engine.begin() as conn:
                for i in range(first, min(count, first + settings.batch_size)):
                    conn.execute(text('INSERT INTO posts (title, body) VALUES (:t, :b)'),
                                 {'t': f'x{i}', 'b': 'b'})
        inserted = time.perf_counter() - started
    finally:
        Base.metadata.drop_all(engine)
        metadata.drop_all(engine)
        engine.dispose()

    def line(label: str, seconds: float) -> str:
        return (f'  {label:<38} {1000 * seconds / count:6.2f} ms/message '
                f'{count / seconds:7.0f}/s  ratio to plain inserts {inserted / seconds:.3f}')
    print(f'{engine.dialect.name}, {count} messages each; plain inserts '
          f'({settings.batch_size} per transaction) at {count / inserted:.0f}/s')
    print(line('creates, gem format (no version)', gem))
    print(line('creates with versions', created))
    print(line('updates with versions, all conflicting', updated))


if __name__ == '__main__':
    default = f'sqlite:///{tempfile.mkdtemp()}/bench.sqlite'
    main(sys.argv[1] if len(sys.argv) > 1 else default,
         int(sys.argv[2]) if len(sys.argv) > 2 else 300)
