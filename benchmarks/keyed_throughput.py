"""Push and pull throughput of a UUID-keyed model against an integer-keyed
one of the same shape, in one run:

    .venv/bin/python benchmarks/keyed_throughput.py [--records N]
        [--db sqlite|postgresql|mysql]

For each model: N records are created and published on central (the
publish is timed), then *pushed*: central's outbound rows are turned into
wire messages as the sync sends them, stored in the facade's inbound
queue and applied there (timed); then every record is edited and
published on the facade and *pulled* the same way into central (timed:
updates, which find their records through the mapping).  No HTTP: this
measures what the key changes, the add-on's publishing and applying
(``benchmarks/sync_throughput.py`` measures the whole exchange).

Databases as in ``sync_throughput.py`` (SQLite files in a temporary
directory, or ``bench_<random>_<label>`` databases on the servers of
``COMMUNICATOR_TEST_PG_URL``/``COMMUNICATOR_TEST_MYSQL_URL``, dropped at
the end).  A warm-up round of 200 records of each model runs first, on
tables made anew for the measured round.  Figures are from one run on a
possibly shared machine: compare the ratios, not the seconds.  Never used as a test.
"""
from __future__ import annotations

import argparse
import tempfile
import time
import types
import uuid
from pathlib import Path

import transaction
import zope.sqlalchemy
from sqlalchemy import Integer, MetaData, String, Uuid, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sync_throughput import Databases

from pyramid_communicator import receives_from
from pyramid_communicator.models import NAMING_CONVENTION, metadata, outbound_messages, utcnow
from pyramid_communicator.publishing import publish_records
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.wire import outbound_to_wire


class BenchBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('bench_int')
class IntKeyed(BenchBase):
    __tablename__ = 'bench_int_keyed'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(String(200))


@receives_from('bench_uuid')
class UuidKeyed(BenchBase):
    __tablename__ = 'bench_uuid_keyed'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(50))
    body: Mapped[str] = mapped_column(String(200))


class App:
    def __init__(self, name: str, engine: Engine) -> None:
        self.name = name
        self.engine = engine
        metadata.create_all(self.engine)
        BenchBase.metadata.create_all(self.engine)
        self.settings = parse_settings({
            'communicator.name': name, 'communicator.username': 'u',
            'communicator.password': 'p', 'communicator.batch_size': '1000',
            'communicator.retry_delay': '0'})

    def session(self) -> tuple[transaction.TransactionManager, Session]:
        tm = transaction.TransactionManager(explicit=True)
        session = Session(bind=self.engine)
        zope.sqlalchemy.register(session, transaction_manager=tm)
        return tm, session

    def drop(self) -> None:
        BenchBase.metadata.drop_all(self.engine)
        metadata.drop_all(self.engine)


def carry(source: App, target: App) -> float:
    """Send ``source``'s pending messages to ``target`` and apply them there;
    the seconds it took."""
    started = time.perf_counter()
    with source.engine.begin() as conn:
        rows = [types.SimpleNamespace(**row._mapping) for row in conn.execute(
            select(outbound_messages).where(outbound_messages.c.delivered_at.is_(None))
            .order_by(outbound_messages.c.id))]
        conn.execute(update(outbound_messages).values(delivered_at=utcnow())
                     .where(outbound_messages.c.delivered_at.is_(None)))
    tm, session = target.session()
    with tm:
        store_inbound(session, source.name, [outbound_to_wire(r, source.name) for r in rows])
    session.close()
    result = apply_inbound(target.engine, target.settings)
    assert result.applied == len(rows) and not result.failed, result
    return time.perf_counter() - started


def run(cls: type, central: App, facade: App, count: int) -> dict[str, float]:
    tm, session = central.session()
    with tm:
        records = [cls(title=f't{i}', body='b' * 100) for i in range(count)]
        session.add_all(records)
        session.flush()
        started = time.perf_counter()
        publish_records(session, records)
        published = time.perf_counter() - started
    session.close()
    pushed = carry(central, facade)
    tm, session = facade.session()
    with tm:
        records = session.scalars(select(cls)).all()
        for record in records:
            record.title = record.title + ' edited'
        session.flush()
        publish_records(session, records)
    session.close()
    pulled = carry(facade, central)
    return {'publish': published, 'push': pushed, 'pull': pulled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--records', type=int, default=2000)
    parser.add_argument('--db', choices=['sqlite', 'postgresql', 'mysql'], default='sqlite')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        databases = Databases(args.db, Path(tmp))
        try:
            engines = [databases.engine(databases.create(label))
                       for label in ('central', 'facade')]
            for count in (200, args.records):  # a warm-up round, then the measured one
                central, facade = App('central', engines[0]), App('facade', engines[1])
                try:
                    figures = {cls.__name__: run(cls, central, facade, count)
                               for cls in (IntKeyed, UuidKeyed)}
                finally:
                    central.drop()
                    facade.drop()
        finally:
            databases.drop_all()
    print(f'{args.records} records, {args.db}')
    print(f'{"":10}{"integer key":>16}{"UUID key":>16}{"UUID/integer":>14}')
    for part in ('publish', 'push', 'pull'):
        a, b = figures['IntKeyed'][part], figures['UuidKeyed'][part]
        print(f'{part:10}{args.records / a:>12.0f} r/s{args.records / b:>12.0f} r/s'
              f'{b / a:>13.2f}x')


if __name__ == '__main__':
    main()
