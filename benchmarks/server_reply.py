"""How long the facade takes to answer a push while a backlog waits:

    .venv/bin/python benchmarks/server_reply.py [--backlog N] [--pushes P]
        [--apply-seconds S] [--batch-size B]

A facade served by ``pserve`` (waitress, 4 threads) on a fresh SQLite
database holds N inbound messages from central, stored but not applied
(new tags, as if they had arrived while ``apply_on_receive`` was off or a
run had stopped): the backlog.  Then central's side of an exchange is
played with ``requests`` as its client sends it: P pushes of one new tag
each, timed from the request to the complete reply.

Two facades, one after the other: ``unbounded`` has
``communicator.apply_seconds = 0`` (the server applies the whole backlog
and purges before it answers, as before this setting), ``bounded`` the
given budget (default: the setting's default).  For each it prints the
reply time of the first push, the median of the others, and how many
messages each reply left applied; the client's default timeout
(``communicator.timeout``, 10 s) is the bar a reply must stay under.

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

import requests
import transaction
from sqlalchemy.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_throughput as bench  # noqa: E402

from pyramid_communicator import wire  # noqa: E402
from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.queues import store_inbound  # noqa: E402
from pyramid_communicator.settings import CommunicatorSettings  # noqa: E402
from pyramid_communicator.sync import make_session  # noqa: E402
from pyramid_communicator.versions import now_hlc  # noqa: E402

STORE_CHUNK = 10_000


def message(number: int) -> dict:
    hlc = now_hlc()
    attributes = bench.tag_values('backlog', number)
    return {'id': number, 'body': json.dumps({'tag': attributes}), 'origin': 'central',
            'original_id': number,
            'version': {'clock': {'central': hlc},
                        'stamps': {key: [hlc, 'central'] for key in attributes}}}


def store_backlog(engine: Engine, n: int) -> None:
    """N messages from central, stored as they arrive, not applied."""
    tm = transaction.TransactionManager(explicit=True)
    session = make_session(engine, tm)
    try:
        for start in range(1, n + 1, STORE_CHUNK):
            items = [message(i) for i in range(start, min(start + STORE_CHUNK, n + 1))]
            with tm:
                store_inbound(session, 'central', wire.parse_messages(json.dumps(items)))
    finally:
        session.close()


def push(url: str, number: int, timeout: float) -> float:
    """One push of one message, as central's client sends it: seconds to
    the complete reply."""
    started = time.monotonic()
    response = requests.post(
        url + '/messages.json', data=json.dumps([message(number)]),
        auth=(bench.USERNAME, bench.PASSWORD), timeout=timeout,
        headers={'Content-Type': 'application/json', wire.NAME_HEADER: 'central',
                 wire.PROTOCOL_HEADER: wire.PROTOCOL_VERSION})
    response.raise_for_status()
    return time.monotonic() - started


def measure(label: str, args, tmp: Path, dbs: bench.Databases,
            apply_seconds: str) -> dict:
    url = dbs.create(f'facade-{label}')
    engine = dbs.engine(url)
    create_tables(engine)
    bench.say(f'{label}: storing a backlog of {args.backlog:,}')
    store_backlog(engine, args.backlog)
    port = bench.free_port()
    ini = bench.write_ini(tmp / f'facade-{label}.ini', bench.app_settings(
        url, 'facade', args.batch_size, **{'communicator.apply_seconds': apply_seconds}), port)
    server = bench.FacadeServer(ini, port, tmp / f'facade-{label}.log').start()
    replies, applied = [], []
    try:
        for i in range(args.pushes):
            replies.append(push(server.url, args.backlog + 1 + i, timeout=3600))
            applied.append(bench.count(engine, 'tags'))
            bench.say(f'{label}: reply {i + 1} in {replies[-1]:.2f}s, '
                      f'{applied[-1]:,} applied')
    finally:
        server.stop()
    return {'first': replies[0], 'rest': statistics.median(replies[1:] or replies),
            'max': max(replies), 'applied': applied}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--backlog', type=int, default=100_000)
    parser.add_argument('--pushes', type=int, default=5)
    parser.add_argument('--apply-seconds', default=str(CommunicatorSettings.apply_seconds))
    parser.add_argument('--batch-size', type=int, default=200)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix='server_reply_bench_'))
    dbs = bench.Databases('sqlite', tmp)
    results = {}
    try:
        for label, seconds in (('unbounded', '0'), ('bounded', args.apply_seconds)):
            results[label] = measure(label, args, tmp, dbs, seconds)
    finally:
        bench.clean_up(None, dbs, tmp)
    print(f'\nserver reply: SQLite, backlog {args.backlog:,}, batch_size={args.batch_size}, '
          f'{args.pushes} pushes of one message, commit {bench.git_commit()}, '
          f'load average {os.getloadavg()[0]:.1f}')
    print(f'{"":>10}  {"apply_seconds":>13}  {"first reply":>11}  {"median rest":>11}  '
          f'{"max":>7}  applied after each reply')
    for label, seconds in (('unbounded', '0'), ('bounded', args.apply_seconds)):
        r = results[label]
        print(f'{label:>10}  {seconds:>13}  {r["first"]:>10.2f}s  {r["rest"]:>10.2f}s  '
              f'{r["max"]:>6.2f}s  {", ".join(f"{n:,}" for n in r["applied"])}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
