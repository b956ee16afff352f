"""What many-to-many links cost next to records:
``python benchmarks/link_throughput.py [N]``.

Central creates N tags in one flush (N record messages), then adds all N
to one post in one flush (N link messages); both queues are carried to a
facade and applied there.  Prints milliseconds per message for publishing
and applying each kind, and the ratio of links to records (timings on a
shared machine are noisy; compare ratios, not seconds).  Two SQLite files
in a temporary directory.
"""
from __future__ import annotations

import sys
import tempfile
import time
import types

import transaction
import zope.sqlalchemy
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from pyramid_communicator import receives_from
from pyramid_communicator.models import OutboundMessage, metadata
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import apply_inbound, make_session
from pyramid_communicator.wire import outbound_to_wire


class BenchBase(DeclarativeBase):
    metadata = MetaData()


bench_post_tags = Table(
    'bench_post_tags', BenchBase.metadata,
    Column('post_id', ForeignKey('bench_posts.id'), primary_key=True),
    Column('tag_id', ForeignKey('bench_tags.id'), primary_key=True))


@receives_from('bench_tag', autopublish=True)
class BenchTag(BenchBase):
    __tablename__ = 'bench_tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('bench_post', autopublish=True)
class BenchPost(BenchBase):
    __tablename__ = 'bench_posts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[BenchTag]] = relationship(secondary=bench_post_tags)


def _timed_write(engine, write) -> float:
    tm = transaction.TransactionManager(explicit=True)
    session = Session(bind=engine)
    zope.sqlalchemy.register(session, transaction_manager=tm)
    started = time.perf_counter()
    with tm:
        write(session)
    seconds = time.perf_counter() - started
    session.close()
    return seconds


def _carry(source, target, sent: set[int]) -> int:
    """Store the source's new outbound messages in the target's inbox."""
    with source.connect() as conn:
        rows = [types.SimpleNamespace(**row._mapping)
                for row in conn.execute(OutboundMessage.__table__.select())
                if row.id not in sent]
    sent.update(row.id for row in rows)
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(target, tm)
    with tm:
        store_inbound(session, 'central', [outbound_to_wire(row, 'central') for row in rows])
    session.close()
    return len(rows)


def _timed_apply(engine, settings) -> float:
    started = time.perf_counter()
    result = apply_inbound(engine, settings)
    assert result.failed == 0, result
    return time.perf_counter() - started


def main(count: int) -> None:
    directory = tempfile.mkdtemp()
    central = create_engine(f'sqlite:///{directory}/central.db')
    facade = create_engine(f'sqlite:///{directory}/facade.db')
    for engine in (central, facade):
        metadata.create_all(engine)
        BenchBase.metadata.create_all(engine)
    settings = parse_settings({'communicator.name': 'facade', 'communicator.username': 'u',
                               'communicator.password': 'p'})
    sent: set[int] = set()

    def create_tags(session: Session) -> None:
        session.add(BenchPost(title='p'))
        session.add_all(BenchTag(name=f't{i}') for i in range(count))

    def link_all(session: Session) -> None:
        post = session.query(BenchPost).one()
        post.tags.extend(session.query(BenchTag).all())

    publish_records = _timed_write(central, create_tags)
    carried = _carry(central, facade, sent)
    apply_records = _timed_apply(facade, settings)
    publish_links = _timed_write(central, link_all)
    assert _carry(central, facade, sent) == count
    apply_links = _timed_apply(facade, settings)

    def per(seconds: float, n: int) -> float:
        return seconds * 1000 / n

    print(f'{count} records, {count} links (SQLite)')
    print(f'publish: records {per(publish_records, carried):.3f} ms/message, '
          f'links {per(publish_links, count):.3f} ms/message, ratio '
          f'{publish_links / count / (publish_records / carried):.2f}')
    print(f'apply:   records {per(apply_records, carried):.3f} ms/message, '
          f'links {per(apply_links, count):.3f} ms/message, ratio '
          f'{apply_links / count / (apply_records / carried):.2f}')


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 500)
