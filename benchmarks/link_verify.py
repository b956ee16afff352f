"""What many-to-many links add to ``pcommunicate --verify``:

    .venv/bin/python benchmarks/link_verify.py [--records N] [--links K] [--differences 0,10,100]

Two SQLite databases in a temporary folder hold the same N posts, each
linked to K of 50 tags, and the same N plain records (the posts' columns,
no collection), with the mappings a sync leaves, written by SQL rather
than synced.  The facade answers ``/verify.json`` in this process
(:func:`pyramid_communicator.verify.answer`, on a request checked by
``parse_request`` as its view does), so the figures are the scans and the
bodies, not HTTP.  It prints, per count D of links deleted by hand on the
facade (and D plain records' titles changed, the same ids): the seconds
and bytes of verifying the posts, the ratio of their seconds to the plain
records' (what reading the links costs, the same number of differences),
and the ratio of bytes to the table's (posts with their members as JSON).

Figures are from one run on a possibly shared machine.  Never a test.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from pyramid_communicator import receives_from
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.models import metadata as communicator_metadata
from pyramid_communicator.verify import Verifier, answer, parse_request

TAGS = 50


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


bench_post_tags = Table(
    'bench_post_tags', Base.metadata,
    Column('post_id', ForeignKey('bench_posts.id'), primary_key=True),
    Column('tag_id', ForeignKey('bench_tags.id'), primary_key=True))


@receives_from('bench_tag')
class BenchTag(Base):
    __tablename__ = 'bench_tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('bench_post')
class BenchPost(Base):
    __tablename__ = 'bench_posts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[BenchTag]] = relationship(secondary=bench_post_tags)


@receives_from('bench_plain')
class BenchPlain(Base):
    __tablename__ = 'bench_plains'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


SEQ = 'WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n) '


def fill(engine, n: int, k: int, origin: str) -> None:
    Base.metadata.create_all(engine)
    communicator_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text(SEQ + "INSERT INTO bench_tags (id, name) SELECT i, 'tag ' || i "
                          'FROM seq'), {'n': TAGS})
        for table in ('bench_posts', 'bench_plains'):
            conn.execute(text(SEQ + f"INSERT INTO {table} (id, title) SELECT i, 'post ' || i "
                              'FROM seq'), {'n': n})
        for j in range(k):
            conn.execute(text(SEQ + 'INSERT INTO bench_post_tags (post_id, tag_id) '
                              f'SELECT i, ((i + {j} * 7) % {TAGS}) + 1 FROM seq'), {'n': n})
        for name, count in (('bench_tag', TAGS), ('bench_post', n), ('bench_plain', n)):
            conn.execute(text(SEQ + 'INSERT INTO communicator_mappings '
                              '(name, origin, original_id, local_id, life) '
                              'SELECT :name, :origin, i, i, 0 FROM seq'),
                         {'n': count, 'name': name, 'origin': origin})


class InProcessPeer:
    """The facade's side of ``/verify.json``, answered here."""

    verify_url = 'in-process'

    def __init__(self, engine) -> None:
        self.engine = engine
        self.verify_bytes_sent = self.verify_bytes_received = self.verify_requests = 0

    def verify_request(self, request: dict) -> tuple[dict, str]:
        body = json.dumps(request, separators=(',', ':')).encode()
        with Session(bind=self.engine) as session, session.begin():
            reply = answer(session, 'facade', parse_request(body))
        out = json.dumps(reply, separators=(',', ':')).encode()
        self.verify_bytes_sent += len(body)
        self.verify_bytes_received += len(out)
        self.verify_requests += 1
        return json.loads(out), 'facade'


def timed(verifier: Verifier, name: str, rounds: int = 3) -> tuple[float, object]:
    times, report = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        report = verifier.run([name])
        times.append(time.perf_counter() - started)
    return statistics.median(times), report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument('--records', type=int, default=20000)
    parser.add_argument('--links', type=int, default=5)
    parser.add_argument('--differences', default='0,10,100')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        central = create_engine(f'sqlite:///{Path(folder) / "central.db"}')
        facade = create_engine(f'sqlite:///{Path(folder) / "facade.db"}')
        fill(central, args.records, args.links, '')
        fill(facade, args.records, args.links, 'central')
        verifier = Verifier(central, 'central', InProcessPeer(facade))
        verifier.run(['bench_plain'])  # warm-up
        table = args.records * len(json.dumps(
            {'bench_post': {'title': 'post 10000',
                            'tags': [['central', 10]] * args.links}}))
        print(f'{args.records} posts x {args.links} links; table ~{table} bytes as JSON')
        print('D      posts s  plain s  ratio  bytes    bytes/table  differences')
        for d in (int(x) for x in args.differences.split(',')):
            step = max(1, args.records // max(d, 1))
            ids = list(range(1, args.records + 1, step))[:d]
            with facade.begin() as conn:
                for post_id in ids:
                    conn.execute(text("UPDATE bench_plains SET title = 'drift' WHERE id = :p"),
                                 {'p': post_id})
                    conn.execute(text('DELETE FROM bench_post_tags WHERE post_id = :p AND '
                                      'tag_id = (SELECT MIN(tag_id) FROM bench_post_tags '
                                      'WHERE post_id = :p)'), {'p': post_id})
            posts, report = timed(verifier, 'bench_post')
            plain, _ = timed(verifier, 'bench_plain')
            print(f'{d:<6} {posts:7.3f}  {plain:7.3f}  {posts / plain:5.2f}  '
                  f'{report.bytes:<8} {report.bytes / table:11.5f}  '
                  f'{len(report.differences)}')
            with facade.begin() as conn:  # undo the drift
                conn.execute(text('DELETE FROM bench_post_tags'))
                conn.execute(text("UPDATE bench_plains SET title = 'post ' || id"))
            with facade.begin() as conn:
                for j in range(args.links):
                    conn.execute(text(SEQ + 'INSERT INTO bench_post_tags (post_id, tag_id) '
                                      f'SELECT i, ((i + {j} * 7) % {TAGS}) + 1 FROM seq'),
                                 {'n': args.records})


if __name__ == '__main__':
    main()
