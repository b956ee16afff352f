"""Plain messages handled per second end to end, next to records per
second, on one backend:

    .venv/bin/python benchmarks/message_throughput.py [--db sqlite|postgresql|mysql]
        [--messages N] [--batch-size B]

Two real apps as in ``sync_throughput.py`` (whose helpers this uses): the
demo facade served by ``pserve``, central run by ``pcommunicate``.  Timed,
each until the receiver has applied everything:

1. pull of N records: N tags created in the facade's database
   (autopublished), ``pcommunicate --pull``;
2. pull of N messages: N ``contact.submitted`` messages sent in the
   facade's database (as its contact form does), ``pcommunicate --pull``;
   central's handler writes a row and sends ``contact.acknowledged`` back;
3. push of those N acknowledgements: ``pcommunicate --push``; the
   facade's handler updates the row the acknowledgement names;
4. push of N records: N tags created on central, ``pcommunicate --push``.

Figures from one run on a possibly shared machine: compare ratios.
Never used as a test.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sync_throughput as st  # noqa: E402

from pyramid_communicator import send  # noqa: E402
from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.demo.models import ContactRequest  # noqa: E402
from pyramid_communicator.messages import SETTINGS_INFO  # noqa: E402
from pyramid_communicator.settings import parse_settings  # noqa: E402


def send_contacts(engine, n: int, chunk: int = 5000) -> float:
    """N contact forms in the facade's database, as its view sends them."""
    settings = parse_settings({'communicator.name': 'facade', 'communicator.username': 'u',
                               'communicator.password': 'p'})
    started = time.perf_counter()
    for start in range(0, n, chunk):
        with st.host_session(engine) as session:
            session.info[SETTINGS_INFO] = settings
            rows = [ContactRequest(name=f'Visitor {i}', email=f'v{i}@example.org',
                                   text='Hello', status='sent')
                    for i in range(start, min(n, start + chunk))]
            session.add_all(rows)
            session.flush()
            for row in rows:
                send(session, 'contact.submitted', {'ref': row.id, 'name': row.name,
                                                    'email': row.email, 'text': row.text},
                     key=row.email)
    return time.perf_counter() - started


def timed(args: list[str], done) -> float:
    started = time.perf_counter()
    subprocess.run([str(st.BIN / 'pcommunicate'), *args], check=True)
    if not done():
        raise RuntimeError(f'pcommunicate {args} left work undone')
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--db', default='sqlite', choices=('sqlite', 'postgresql', 'mysql'))
    parser.add_argument('--messages', type=int, default=5000)
    parser.add_argument('--batch-size', type=int, default=1000)
    args = parser.parse_args()
    n = args.messages
    tmp = Path(tempfile.mkdtemp(prefix='message-bench-'))
    dbs = st.Databases(args.db, tmp)
    server = None
    try:
        central_url, facade_url = dbs.create('central'), dbs.create('facade')
        central, facade = dbs.engine(central_url), dbs.engine(facade_url)
        create_tables(central)
        create_tables(facade)
        port = st.free_port()
        facade_ini = st.write_ini(tmp / 'facade.ini', st.app_settings(
            facade_url, 'facade', args.batch_size), port)
        central_ini = st.write_ini(tmp / 'central.ini', st.app_settings(
            central_url, 'central', args.batch_size,
            **{'communicator.base_uri': f'http://127.0.0.1:{port}'}))
        server = st.FacadeServer(facade_ini, port, tmp / 'facade.log').start()
        ini = str(central_ini)
        figures = {}

        st.create_tags(facade, 'pulled', n)
        figures['records pulled'] = timed(
            [ini, '--pull'], lambda: st.count(central, 'tags') == n)
        st.say(f'sent {n} messages in {send_contacts(facade, n):.2f}s (untimed)')
        figures['messages pulled'] = timed(
            [ini, '--pull'], lambda: st.count(central, 'contact_requests') == n)
        figures['messages pushed'] = timed(
            [ini, '--push'],
            lambda: st.count(facade, 'contact_requests', "status = 'acknowledged'") == n)
        st.create_tags(central, 'pushed', n)
        figures['records pushed'] = timed(
            [ini, '--push'], lambda: st.count(facade, 'tags') == 2 * n)
        print(f'{args.db}, {n} each, batch size {args.batch_size}:')
        for what, seconds in figures.items():
            print(f'  {what:16} {seconds:7.2f}s  {n / seconds:8.0f}/s')
        print('  (messages pulled: each handler writes a row and sends an acknowledgement;'
              '\n   messages pushed: each handler updates a row)')
    finally:
        if server is not None:
            server.stop()
        dbs.drop_all()


if __name__ == '__main__':
    main()
