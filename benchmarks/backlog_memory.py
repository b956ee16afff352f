"""Peak memory of a sync with a large backlog each way:

    .venv/bin/python benchmarks/backlog_memory.py [--db sqlite|postgresql|mysql]
        [--sizes 100000,200000] [--batch-size B]

For each size N, on fresh databases (as in ``sync_throughput.py``): N
undelivered tag messages in central's outbound queue and N in the
facade's (made with set-based SQL, like the idle fill there: bodies,
versions and identities as publishing writes them), the facade served by
``pserve``, then one ``pcommunicate central.ini`` (push, pull, apply)
until both sides hold N tags.  It prints the peak RSS of ``pcommunicate``
(``wait4`` rusage) and of the facade server (``VmHWM``) per size: flat
figures across sizes mean memory does not grow with the backlog.

Figures are from one run on a possibly shared machine.  Never a test.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_throughput as bench  # noqa: E402

from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.models import utcnow  # noqa: E402

HEAD = '{{"tag":{{"name":"{}-'
TAIL = '","label":"Label","color":"red","weight":1}}'


def fill_backlog(engine: Engine, n: int, prefix: str) -> float:
    """N undelivered outbound tag messages of records made here (their own
    identity, a version stamped now).  Neither the tags nor their mappings
    are needed to send them, so they are not made."""
    dialect = engine.dialect.name
    hlc = int(time.time() * 1_000_000)
    version = json.dumps({'clock': {'': hlc}, 'stamps': {
        key: [hlc, ''] for key in ('color', 'label', 'name', 'weight')}}, separators=(',', ':'))
    started = time.perf_counter()
    for first in range(1, n + 1, bench.FILL_CHUNK):
        last = min(n, first + bench.FILL_CHUNK - 1)
        now = utcnow()
        if dialect == 'sqlite':
            now = now.strftime('%Y-%m-%d %H:%M:%S.%f')
        params = {'head': HEAD.format(prefix), 'tail': TAIL, 'now': now, 'a': first, 'b': last,
                  'v': version}
        if dialect == 'postgresql':
            source = 'generate_series(CAST(:a AS BIGINT), CAST(:b AS BIGINT)) AS seq(n)'
            body = 'CAST(:head AS TEXT) || CAST(n AS TEXT) || CAST(:tail AS TEXT)'
            num, prefix_sql = 'n', ''
        elif dialect in ('mysql', 'mariadb'):
            source = f'seq_{first}_to_{last} AS seq'
            body, num, prefix_sql = 'CONCAT(:head, seq.seq, :tail)', 'seq.seq', ''
        else:
            source = 'seq'
            body, num = ':head || n || :tail', 'n'
            prefix_sql = ('WITH RECURSIVE seq(n) AS (SELECT :a UNION ALL '
                          'SELECT n + 1 FROM seq WHERE n < :b) ')
        with engine.begin() as conn:
            conn.execute(text(
                f'{prefix_sql}INSERT INTO outbound_messages (body, origin, original_id, version, '
                f'created_at) SELECT {body}, NULL, {num}, :v, :now FROM {source}'), params)
    return time.perf_counter() - started


def one_size(backend: str, n: int, batch: int, tmp: Path) -> dict[str, float]:
    dbs = bench.Databases(backend, tmp)
    server = None
    logs = tmp / f'logs-{n}'
    logs.mkdir()
    try:
        central_url, facade_url = dbs.create(f'central{n}'), dbs.create(f'facade{n}')
        central, facade = dbs.engine(central_url), dbs.engine(facade_url)
        for engine in (central, facade):
            create_tables(engine)
        bench.say(f'N={n:,}: filling both outbound queues')
        fill = fill_backlog(central, n, 'c') + fill_backlog(facade, n, 'f')
        port = bench.free_port()
        facade_ini = bench.write_ini(tmp / f'facade{n}.ini',
                                     bench.app_settings(facade_url, 'facade', batch), port)
        server = bench.FacadeServer(facade_ini, port, logs / 'facade.log').start()
        central_ini = bench.write_ini(tmp / f'central{n}.ini', bench.app_settings(
            central_url, 'central', batch, **{'communicator.base_uri': server.url}))
        bench.say(f'N={n:,}: pcommunicate (push, pull, apply)')
        run = bench.pcommunicate(central_ini, logs=logs, label='sync', timeout=4 * 3600)
        bench.wait_until(bench.synced(facade, n, n), timeout=600)
        if bench.count(central, 'tags') != n:
            raise RuntimeError(f'central holds {bench.count(central, "tags")} tags, not {n}')
        return {'fill': fill, 'seconds': run.seconds, 'client_rss': run.maxrss_kib,
                'server_rss': server.peak_rss_kib() or 0, 'summary': run.stdout.strip()}
    finally:
        bench.clean_up(server, dbs, tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--db', choices=('sqlite', 'postgresql', 'mysql'), default='sqlite')
    parser.add_argument('--sizes', default='100000,200000',
                        help='backlog sizes each way, comma-separated (default 100000,200000)')
    parser.add_argument('--batch-size', type=int, default=1000)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(',')]
    tmp = Path(tempfile.mkdtemp(prefix='backlog_bench_'))
    results = {n: one_size(args.db, n, args.batch_size, tmp) for n in sizes}
    print(f'\nbacklog memory: backend {args.db}, communicator.batch_size={args.batch_size}, '
          f'commit {bench.git_commit()}, load average {os.getloadavg()[0]:.1f}')
    print(f'{"N each way":>12}  {"run":>9}  {"rate":>9}  {"peak RSS pcommunicate":>22}  '
          f'{"peak RSS facade":>16}')
    for n, r in results.items():
        print(f'{n:>12,}  {r["seconds"]:>8.0f}s  {2 * n / r["seconds"]:>7,.0f}/s  '
              f'{bench.mib(r["client_rss"]):>22}  {bench.mib(r["server_rss"]):>16}')
    for n, r in results.items():
        print(f'N={n:,}: {r["summary"]}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
