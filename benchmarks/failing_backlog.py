"""What a pile of failing inbound messages costs every later run:

    .venv/bin/python benchmarks/failing_backlog.py [--failing F] [--runs R]
        [--retry-delay S] [--retry-limit L]

Two centrals on fresh SQLite databases, each against a facade of its own
served by ``pserve``, both set up as in ``sync_throughput.py``.  One
central (``failing``) holds F inbound messages from the facade that cannot
apply: comments on posts that never arrive ("not here (yet)", a
``LookupError`` in applying), each a record of its own, as a hostile peer
could send them.  The other (``empty``) holds none.  A first run on the
failing central tries them all and keeps them failed (untimed, shown);
then R runs of ``pcommunicate central.ini`` on each, taking turns, so the
load of other jobs on the machine falls on both alike.  Each run also
carries a little real work both ways (a few tags created on each side
before it), as a cron run usually does.

The default ``communicator.retry_delay`` is 0 here: every failure is due
again at every run, the worst case for back-off, so what bounds a run's
retries is ``communicator.retry_limit``.  It prints the median wall time
of the runs on each side, their ratio, and how many failures each run
tried again (``attempts`` in the database).

Figures are from one run on a possibly shared machine.  Never a test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import transaction
from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_throughput as bench  # noqa: E402

from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.demo.models import Tag  # noqa: E402
from pyramid_communicator.queues import store_inbound  # noqa: E402
from pyramid_communicator.sync import make_session  # noqa: E402
from pyramid_communicator.wire import WireMessage  # noqa: E402

#: Tags created on each side before each timed run: the run's real work.
WORK_EACH_WAY = 20


def store_failing(engine: Engine, n: int, sender: str = 'hostile') -> None:
    """N comments on posts that never arrive, as if from another peer (so
    that they take no remote id the real facade's messages use), each with
    the version a peer of ours sends."""
    hlc = time.time_ns() // 1000
    version = {'clock': {sender: hlc}, 'stamps': {'body': [hlc, sender],
                                                  'post_id': [hlc, sender]}}
    messages = [WireMessage(i, json.dumps({'comment': {'body': f'orphan {i}'}}), sender, i,
                            {'post_id': [sender, 1_000_000 + i]}, version)
                for i in range(1, n + 1)]
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    try:
        with tm:
            store_inbound(session, sender, messages)
    finally:
        session.close()


def make_work(central: Engine, facade: Engine, run: int) -> None:
    for engine, prefix in ((central, 'c'), (facade, 'f')):
        with bench.host_session(engine) as session:
            session.add_all(Tag(**bench.tag_values(f'{prefix}{run}', i))
                            for i in range(WORK_EACH_WAY))


def attempts(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(text('SELECT COALESCE(SUM(attempts), 0) FROM inbound_messages '
                                 'WHERE processed_at IS NULL')).scalar()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--failing', type=int, default=2000)
    parser.add_argument('--runs', type=int, default=5)
    parser.add_argument('--retry-delay', default='0',
                        help='communicator.retry_delay of both centrals (default 0: '
                             'every failure due at every run)')
    parser.add_argument('--retry-limit', default=None,
                        help='communicator.retry_limit (default: the setting\'s default)')
    parser.add_argument('--batch-size', type=int, default=200)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix='failing_bench_'))
    logs = tmp / 'logs'
    logs.mkdir()
    dbs = bench.Databases('sqlite', tmp)
    servers = []
    sides: dict[str, tuple[Engine, Engine, Path]] = {}
    extra = {'communicator.retry_delay': args.retry_delay}
    if args.retry_limit is not None:
        extra['communicator.retry_limit'] = args.retry_limit
    try:
        for label in ('empty', 'failing'):
            central_url, facade_url = dbs.create(f'central-{label}'), dbs.create(
                f'facade-{label}')
            central, facade = dbs.engine(central_url), dbs.engine(facade_url)
            for engine in (central, facade):
                create_tables(engine)
            port = bench.free_port()
            facade_ini = bench.write_ini(tmp / f'facade-{label}.ini', bench.app_settings(
                facade_url, 'facade', args.batch_size), port)
            server = bench.FacadeServer(facade_ini, port, logs / f'facade-{label}.log')
            servers.append(server.start())
            central_ini = bench.write_ini(tmp / f'central-{label}.ini', bench.app_settings(
                central_url, 'central', args.batch_size,
                **{'communicator.base_uri': server.url, **extra}))
            sides[label] = (central, facade, central_ini)
            if label == 'failing':
                store_failing(central, args.failing)
        first = {label: bench.pcommunicate(ini, logs=logs, label=f'{label}-first')
                 for label, (_, _, ini) in sides.items()}
        failed = bench.count(sides['failing'][0], 'inbound_messages', 'failed_at IS NOT NULL')
        if failed != args.failing:
            raise RuntimeError(f'{failed} failed messages, not {args.failing}')
        runs: dict[str, list[bench.Run]] = {label: [] for label in sides}
        retried: list[int] = []
        for i in range(args.runs):
            for label, (central, facade, ini) in sides.items():
                make_work(central, facade, i)
                before = attempts(central)
                runs[label].append(bench.pcommunicate(ini, logs=logs, label=f'{label}-{i}'))
                if label == 'failing':
                    retried.append(attempts(central) - before)
                summary = runs[label][-1].summary
                if summary.get('pushed') != WORK_EACH_WAY or summary.get('applied') != (
                        WORK_EACH_WAY):
                    raise RuntimeError(f'run {label}-{i} did not do its work: '
                                       f'{runs[label][-1].stdout}')
    finally:
        for server in servers:
            server.stop()
        bench.clean_up(None, dbs, tmp)

    wall = {label: statistics.median(r.seconds for r in each) for label, each in runs.items()}
    inner = {label: statistics.median(r.summary.get('seconds', 0.0) for r in each)
             for label, each in runs.items()}
    print(f'\nfailing backlog: SQLite, {args.failing:,} failing inbound messages, '
          f'retry_delay={args.retry_delay}, retry_limit={args.retry_limit or "default"}, '
          f'batch_size={args.batch_size}, commit {bench.git_commit()}, '
          f'load average {os.getloadavg()[0]:.1f}')
    print(f'first run (tries all {args.failing:,}): failing {first["failing"].seconds:.2f}s, '
          f'empty {first["empty"].seconds:.2f}s')
    print(f'{"":>8}  {"wall (median)":>14}  {"inside pcommunicate":>20}')
    for label in sides:
        print(f'{label:>8}  {wall[label]:>13.2f}s  {inner[label]:>19.2f}s')
    print(f'ratio failing/empty: wall {wall["failing"] / wall["empty"]:.2f}x, '
          f'inside {inner["failing"] / max(inner["empty"], 1e-9):.2f}x')
    print(f'failures tried again per run: {retried}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
