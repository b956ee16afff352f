"""How fast received messages are applied, next to what the database does
for plain row inserts: ``python benchmarks/apply_throughput.py [URL] [N]``.

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


def main(url: str, count: int) -> None:
    engine = create_engine(url)
    Base.metadata.drop_all(engine)
    metadata.drop_all(engine)
    create_tables(engine)
    try:
        tm = transaction.TransactionManager(explicit=True)
        session = make_session(engine, tm)
        with tm:
            store_inbound(session, 'central', [
                WireMessage(i, json.dumps({'post': {'title': f't{i}', 'body': 'b'}}),
                            'central', i) for i in range(1, count + 1)])
        settings = parse_settings({'communicator.name': 'facade',
                                   'communicator.username': 'u',
                                   'communicator.password': 'p'})
        started = time.perf_counter()
        result = apply_inbound(engine, settings)
        applied = time.perf_counter() - started
        assert result.applied == count, result

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
    print(f'{engine.dialect.name}: applied {count} messages at {count / applied:.0f}/s; '
          f'plain inserts ({settings.batch_size} per transaction) at {count / inserted:.0f}/s; '
          f'ratio {inserted / applied:.3f}')


if __name__ == '__main__':
    default = f'sqlite:///{tempfile.mkdtemp()}/bench.sqlite'
    main(sys.argv[1] if len(sys.argv) > 1 else default,
         int(sys.argv[2]) if len(sys.argv) > 2 else 300)
