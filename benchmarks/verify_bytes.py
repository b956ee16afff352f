"""What ``pcommunicate --verify`` moves and takes, against the size of
the table it compares:

    .venv/bin/python benchmarks/verify_bytes.py [--records N] [--differences 0,10,1000]

Two apps on fresh SQLite databases: the facade served by ``pserve``
(waitress) on a free loopback port, central as an ini file that
``pcommunicate`` (a subprocess) runs against.  Both hold the same N tags
with the sync metadata a sync leaves (a ``communicator_mappings`` row per
tag, central's own and the facade's of central's origin), written by SQL
(a recursive CTE) rather than synced, so that a large table is quick to
make.  For each count D of differences, D tags spread evenly over the
table get another label in the facade's database (by hand, as drift
would), ``pcommunicate central.ini --verify tag --json`` is timed, and the
bytes it reports (request and reply bodies of ``/verify.json``, as on the
wire, gzip where used; HTTP headers not counted) are set against the
table's data: the wire bodies of all N tags (what ``--publish-all`` would
send), plain and gzip-compressed.  The drift is undone before the next D.

Figures are from one run on a possibly shared machine.  Never a test.
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_throughput as bench  # noqa: E402

from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.records import encode_body  # noqa: E402

COLORS = bench.COLORS


def fill(engine: Engine, n: int, origin: str) -> None:
    """N tags and their mappings (``origin`` '' on central, 'central' on
    the facade), ids 1..N on both sides."""
    with engine.begin() as conn:
        conn.execute(text(
            'WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n) '
            "INSERT INTO tags (id, name, label, color, weight) SELECT i, 'tag-' || i, "
            "'Label ' || i, CASE i % 3 WHEN 0 THEN 'red' WHEN 1 THEN 'green' ELSE 'blue' END, "
            'i % 100 FROM seq'), {'n': n})
        conn.execute(text(
            'WITH RECURSIVE seq(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM seq WHERE i < :n) '
            'INSERT INTO communicator_mappings (name, origin, original_id, local_id, life) '
            "SELECT 'tag', :origin, i, i, 0 FROM seq"), {'n': n, 'origin': origin})


def table_bytes(engine: Engine) -> tuple[int, int]:
    """The wire bodies of every tag, plain and gzip-compressed (level 1,
    as the sync sends them)."""
    with engine.connect() as conn:
        bodies = [encode_body('tag', dict(row._mapping)).encode()
                  for row in conn.execute(text('SELECT name, label, color, weight FROM tags '
                                               'ORDER BY id'))]
    joined = b'\n'.join(bodies)
    return sum(len(b) for b in bodies), len(gzip.compress(joined, compresslevel=1))


def drift(engine: Engine, n: int, d: int, label: str | None) -> None:
    """Give D evenly spread tags another label (None: their own again)."""
    if not d:
        return
    ids = sorted({1 + (k * n) // d for k in range(d)})
    value = "'drift'" if label else "'Label ' || id"
    with engine.begin() as conn:
        for start in range(0, len(ids), 500):
            chunk = ','.join(map(str, ids[start:start + 500]))
            conn.execute(text(f'UPDATE tags SET label = {value} WHERE id IN ({chunk})'))


class Facade(bench.FacadeServer):
    """The facade, waited for on a route that answers at once (the demo's
    ``/tags`` lists the whole table)."""
    probe = '/verify.json'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--records', type=int, default=100_000)
    parser.add_argument('--differences', default='0,10,1000')
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.differences.split(',')]
    tmp = Path(tempfile.mkdtemp(prefix='verify-bytes-'))
    engines = {}
    for name in ('central', 'facade'):
        url = f'sqlite:///{tmp / (name + ".sqlite")}'
        engines[name] = create_engine(url)
        create_tables(engines[name])
    bench.say(f'filling {args.records:,} tags on each side')
    fill(engines['central'], args.records, '')
    fill(engines['facade'], args.records, 'central')
    plain, compressed = table_bytes(engines['central'])
    port = bench.free_port()
    facade_ini = bench.write_ini(
        tmp / 'facade.ini', bench.app_settings(str(engines['facade'].url), 'facade', 1000,
                                               **{'communicator.max_body_bytes':
                                                  str(64 * 1024 * 1024)}), port)
    server = Facade(facade_ini, port, tmp / 'facade.log').start()
    central_ini = bench.write_ini(tmp / 'central.ini', bench.app_settings(
        str(engines['central'].url), 'central', 1000,
        **{'communicator.base_uri': server.url,
           'communicator.max_body_bytes': str(64 * 1024 * 1024)}))
    rows = []
    try:
        for d in counts:
            drift(engines['facade'], args.records, d, 'drift')
            started = time.perf_counter()
            result = subprocess.run([str(bench.BIN / 'pcommunicate'), str(central_ini),
                                     '--verify', 'tag', '--json'],
                                    capture_output=True, text=True, timeout=3600)
            seconds = time.perf_counter() - started
            if result.returncode not in (0, 3):
                raise RuntimeError(result.stdout + result.stderr[-3000:])
            report = json.loads(result.stdout)
            found = len(report['differences'])
            if found != d:
                raise RuntimeError(f'{d} differences made, {found} found')
            rows.append((d, report, seconds))
            bench.say(f'{d} differences: {report["bytes"]:,} bytes, {seconds:.2f} s')
            drift(engines['facade'], args.records, d, None)
    finally:
        server.stop()
        for engine in engines.values():
            engine.dispose()
    print(f'verify_bytes: {args.records:,} tags on SQLite; table data {plain:,} bytes '
          f'({compressed:,} gzip-1)')
    print(f'{"differences":>11} {"bytes":>11} {"% of data":>9} {"% of gzip":>9} '
          f'{"requests":>8} {"ranges":>7} {"records":>7} {"wall s":>7} {"verify s":>8}')
    for d, report, seconds in rows:
        print(f'{d:>11,} {report["bytes"]:>11,} {100 * report["bytes"] / plain:>8.2f}% '
              f'{100 * report["bytes"] / compressed:>8.2f}% {report["requests"]:>8} '
              f'{report["ranges"]:>7} {report["records"]:>7} {seconds:>7.2f} '
              f'{report["seconds"]:>8.2f}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
