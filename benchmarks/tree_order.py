"""What the order of a tree's messages costs: ``python
benchmarks/tree_order.py [URL] [N] [LEVELS] [BATCH]``.

A tree of N categories in LEVELS levels is applied by one run, its
messages delivered parents first (each record finds its parent), then,
into a fresh database, children first (each batch waits for records of
later batches: set aside and applied in passes at the end of the run).
Both must arrive in one run; prints the runs and the ratio of the
children-first run's time to the parents-first one's (medians of three
rounds taking turns, after a warm-up).

Timings on a shared machine are noisy: compare ratios, not seconds.  URL
defaults to a SQLite file in a temporary directory; the tables are created
there and dropped afterwards, so point it at a scratch database.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

import transaction
from sqlalchemy import ForeignKey, Integer, MetaData, String, create_engine, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pyramid_communicator import receives_from
from pyramid_communicator.models import NAMING_CONVENTION, metadata
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import apply_inbound, make_session
from pyramid_communicator.wire import WireMessage


class BenchBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('bench_category')
class BenchCategory(BenchBase):
    __tablename__ = 'bench_categories'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey('bench_categories.id'))


def tree(count: int, levels: int) -> list[WireMessage]:
    """Versioned creates from central, parents first."""
    hlc = time.time_ns() // 1000 - 10 ** 9
    messages, previous, made = [], [], 0
    for level in range(levels):
        width = 1 if level == 0 else (count - made) // (levels - level)
        current = []
        for n in range(width):
            made += 1
            parent = previous[n % len(previous)] if previous else None
            attributes = {'name': f'L{level}-{n}', 'parent_id': parent}
            version = {'clock': {'central': hlc + made},
                       'stamps': {key: [hlc + made, 'central'] for key in attributes}}
            messages.append(WireMessage(made, json.dumps({'bench_category': attributes}),
                                        'central', made,
                                        {'parent_id': ['central', parent]} if parent else None,
                                        version))
            current.append(made)
        previous = current
    return messages


def run(url: str, messages: list[WireMessage], batch: int) -> tuple[float, int]:
    """Seconds of the first run, and the runs it took to apply everything."""
    engine = create_engine(url)
    BenchBase.metadata.drop_all(engine)
    metadata.drop_all(engine)
    metadata.create_all(engine)
    BenchBase.metadata.create_all(engine)
    settings = parse_settings({'communicator.name': 'facade', 'communicator.username': 'u',
                               'communicator.password': 'p', 'communicator.retry_delay': '0',
                               'communicator.batch_size': str(batch)})
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    with tm:
        store_inbound(session, 'central', messages)
    started = time.perf_counter()
    applied = apply_inbound(engine, settings).applied
    seconds = time.perf_counter() - started
    runs = 1
    while applied < len(messages) and runs < 50:
        applied += apply_inbound(engine, settings).applied
        runs += 1
    with tm:
        assert len(session.scalars(select(BenchCategory)).all()) == len(messages)
    session.close()
    BenchBase.metadata.drop_all(engine)
    metadata.drop_all(engine)
    engine.dispose()
    return seconds, runs


def main(url: str, count: int, levels: int, batch: int, rounds: int = 3) -> None:
    messages = tree(count, levels)
    backward = [WireMessage(i + 1, m.body, m.origin, m.original_id, m.refs, m.version)
                for i, m in enumerate(reversed(messages))]
    run(url, tree(20, 3), batch)  # warm up: imports, compiled statements
    forwards, backwards = [], []
    for _ in range(rounds):  # taking turns: the machine's load falls on both
        forwards.append(run(url, messages, batch))
        backwards.append(run(url, backward, batch))
    forward_seconds = statistics.median(seconds for seconds, _ in forwards)
    backward_seconds = statistics.median(seconds for seconds, _ in backwards)
    forward_runs = max(runs for _, runs in forwards)
    backward_runs = max(runs for _, runs in backwards)
    print(f'{count} categories, {levels} levels, batches of {batch}')
    print(f'parents first:  {forward_runs} run(s), {forward_seconds * 1000 / count:.2f} ms '
          'a message')
    print(f'children first: {backward_runs} run(s), {backward_seconds * 1000 / count:.2f} ms '
          'a message')
    print(f'ratio children first / parents first: {backward_seconds / forward_seconds:.2f}')


if __name__ == '__main__':
    args = sys.argv[1:]
    url = args[0] if args and args[0] else f'sqlite:///{tempfile.mkdtemp()}/tree_order.db'
    main(url, int(args[1]) if len(args) > 1 else 200, int(args[2]) if len(args) > 2 else 5,
         int(args[3]) if len(args) > 3 else 200)
