"""What a hostile facade's replies cost ``pcommunicate``:

    .venv/bin/python benchmarks/hostile_replies.py [--timeout 10] [--huge-mib 190]
        [--bomb-mib 1024] [--drip-every 2]

Central (SQLite, communicator.timeout as given, max_body_bytes at its
default of 10 MiB) runs ``pcommunicate --pull`` against the raw-socket
hostile facade of ``tests/hostile.py`` serving (a) a reply of 190 MiB,
(b) a gzip bomb of about 1 MB that inflates to 1 GiB, (c) a reply of one
byte every 2 s.  For each: exit status, wall time and the peak RSS of that
``pcommunicate`` process alone (the rusage ``wait4`` returns).  Targets:
peak RSS at most 150 MB, the drip cut within twice the timeout.

Figures are from one run on a possibly shared machine.  Never a test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import create_engine

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
from hostile import drip, gzip_bomb, hostile_server, huge, plain_push  # noqa: E402

from pyramid_communicator.demo import create_tables  # noqa: E402

BIN = Path(sys.executable).parent
MIB = 1024 * 1024
RSS_TARGET_MB = 150


def write_ini(path: Path, db: Path, base_uri: str, timeout: float) -> Path:
    path.write_text('\n'.join([
        '[app:main]', 'use = egg:pyramid_communicator#demo',
        f'sqlalchemy.url = sqlite:///{db}', 'communicator.name = central',
        'communicator.username = u', 'communicator.password = p',
        f'communicator.base_uri = {base_uri}', f'communicator.timeout = {timeout:g}',
        '', '[loggers]', 'keys = root', '[handlers]', 'keys = console',
        '[formatters]', 'keys = generic', '[logger_root]', 'level = WARNING',
        'handlers = console', '[handler_console]', 'class = StreamHandler',
        'args = (sys.stderr,)', 'level = NOTSET', 'formatter = generic',
        '[formatter_generic]', 'format = %(levelname)s [%(name)s] %(message)s', '']))
    return path


def one(label: str, reply, tmp: Path, timeout: float) -> dict:
    db = tmp / f'{label}.sqlite'
    engine = create_engine(f'sqlite:///{db}')
    create_tables(engine)
    engine.dispose()
    with hostile_server(lambda request: plain_push(request) or reply()) as facade:
        ini = write_ini(tmp / f'{label}.ini', db, facade.url, timeout)
        started = time.perf_counter()
        process = subprocess.Popen([str(BIN / 'pcommunicate'), str(ini), '--pull'],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        err = process.stderr.read().decode(errors='replace').strip()
        process.stdout.close()
        process.stderr.close()
    return {'label': label, 'exit': os.waitstatus_to_exitcode(status), 'seconds': seconds,
            'rss_mb': usage.ru_maxrss / 1024, 'message': err.splitlines()[-1] if err else ''}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--timeout', type=float, default=10.0)
    parser.add_argument('--huge-mib', type=int, default=190)
    parser.add_argument('--bomb-mib', type=int, default=1024)
    parser.add_argument('--drip-every', type=float, default=2.0)
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix='hostile_bench_'))
    cases = [
        (f'huge {args.huge_mib} MiB', lambda: huge(args.huge_mib * MIB)),
        (f'gzip bomb -> {args.bomb_mib} MiB', lambda: gzip_bomb(args.bomb_mib * MIB)),
        (f'drip 1 B/{args.drip_every:g}s', lambda: drip(args.drip_every)),
    ]
    results = [one(f'case{i}', reply, tmp, args.timeout) | {'label': label}
               for i, (label, reply) in enumerate(cases)]
    print(f'\nhostile replies: communicator.timeout={args.timeout:g}, '
          f'load average {os.getloadavg()[0]:.1f}')
    print(f'{"reply":<26} {"exit":>4} {"wall":>8} {"peak RSS":>10}  message')
    ok = True
    for r in results:
        print(f'{r["label"]:<26} {r["exit"]:>4} {r["seconds"]:>7.1f}s {r["rss_mb"]:>7.0f} MB  '
              f'{r["message"][:90]}')
        ok = ok and r['exit'] == 1 and r['rss_mb'] <= RSS_TARGET_MB
    drip_ok = results[2]['seconds'] <= 2 * args.timeout
    print(f'targets: peak RSS <= {RSS_TARGET_MB} MB and exit 1: {"met" if ok else "MISSED"}; '
          f'drip wall <= {2 * args.timeout:g}s: {"met" if drip_ok else "MISSED"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
