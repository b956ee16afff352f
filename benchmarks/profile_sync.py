"""Where the time of a sync goes, with pyinstrument:

    .venv/bin/pip install pyinstrument
    .venv/bin/python benchmarks/profile_sync.py [--db sqlite|postgresql|mysql] [--records N]

Two profiles, on fresh databases (created and dropped as in
``sync_throughput.py``):

* apply at the facade, as during a push: N tag messages produced by a
  central app are stored in the facade's inbound queue (as the POST
  handler stores them), then ``apply_inbound`` (what the facade runs in
  the request's after-commit hook) runs in this process under the profiler;
* ``pcommunicate central.ini --pull`` run in this process under the
  profiler (the facade served by ``pserve`` holds N pending tags).

For each it prints the top functions by inclusive time (the package's
own and the database driver's) and by self time, as a share of the
profiled wall time, and writes the full pyinstrument trees to text files.
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import transaction
from pyinstrument import Profiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sync_throughput as bench  # noqa: E402

from pyramid_communicator import queues, wire  # noqa: E402
from pyramid_communicator.demo import create_tables  # noqa: E402
from pyramid_communicator.settings import parse_settings  # noqa: E402
from pyramid_communicator.sync import apply_inbound, make_session  # noqa: E402


def summarise(session, title: str, out: Path, top: int = 15) -> str:
    root = session.root_frame()
    total = root.time
    inclusive: dict[str, float] = collections.defaultdict(float)
    self_time: dict[str, float] = collections.defaultdict(float)

    def name(frame) -> str:
        path = frame.file_path_short or frame.file_path or ''
        function = f'{frame.class_name}.{frame.function}' if frame.class_name else frame.function
        return f'{function} ({path}:{frame.line_no})'

    def walk(frame, on_stack: set[str]) -> None:
        if frame.is_synthetic:  # pyinstrument's "[self]" leaves: in total_self_time
            return
        key = name(frame)
        if key not in on_stack:  # count recursion once
            inclusive[key] += frame.time
        self_time[key] += frame.total_self_time
        for child in frame.children:
            walk(child, on_stack | {key})
    walk(root, set())

    def table(values: dict[str, float], keep) -> list[str]:
        rows = sorted(((v, k) for k, v in values.items() if keep(k)), reverse=True)[:top]
        return [f'  {100 * v / total:5.1f}%  {v:7.2f} s  {k}' for v, k in rows]

    library = ('Connection.execute (sqlalchemy/engine/base', 'do_execute', 'do_executemany',
               'Cursor.execute', 'Cursor.executemany', 'Connection.wait', 'commit',
               'Session.flush', 'Session.execute', 'Session.get', 'dumps (json', 'loads (json',
               'compress', 'Session.request', 'recv_into', 'Compiled', 'compile')
    ours = table(inclusive, lambda k: 'pyramid_communicator' in k)
    driver = table(inclusive, lambda k: 'pyramid_communicator' not in k
                   and any(s in k for s in library))
    selfs = table(self_time, lambda k: True)
    lines = [f'== {title}: {total:.2f} s profiled ==',
             '-- inclusive time, pyramid_communicator functions --', *ours,
             '-- inclusive time, SQL / driver / JSON / HTTP (library functions) --', *driver,
             '-- self time, all functions --', *selfs]
    out.write_text(session_text(session))
    return '\n'.join(lines)


def session_text(session) -> str:
    from pyinstrument.renderers import ConsoleRenderer
    return ConsoleRenderer(unicode=False, color=False, show_all=False,
                           short_mode=False).render(session)


def prepare_inbound(dbs: bench.Databases, n: int, batch: int) -> tuple[str, object]:
    """A facade database whose inbound queue holds N messages made by a
    central app, stored as the POST handler stores them."""
    central_url, facade_url = dbs.create('pcentral'), dbs.create('pfacade')
    central, facade = dbs.engine(central_url), dbs.engine(facade_url)
    create_tables(central)
    create_tables(facade)
    bench.create_tags(central, 'c', n)
    tm = transaction.TransactionManager(explicit=True)
    source, target = make_session(central, tm), make_session(facade, tm)
    after = 0
    while True:
        with tm:
            rows = queues.pending_outbound(source, batch, after)
            if not rows:
                break
            queues.store_inbound(target, 'central',
                                 [wire.outbound_to_wire(r, 'central') for r in rows])
        after = rows[-1].id
    source.close()
    target.close()
    return facade_url, facade


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--db', choices=('sqlite', 'postgresql', 'mysql'), default='sqlite')
    parser.add_argument('--records', type=int, default=20000)
    parser.add_argument('--batch-size', type=int, default=1000)
    args = parser.parse_args(argv)
    n, batch = args.records, args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix='sync_profile_'))
    dbs = bench.Databases(args.db, tmp)
    server = None
    reports = []
    try:
        # 1. the facade's apply, as in a push
        bench.say(f'preparing {n} inbound messages at a facade')
        facade_url, facade = prepare_inbound(dbs, n, batch)
        settings = parse_settings(bench.app_settings(facade_url, 'facade', batch))
        profiler = Profiler(interval=0.001)
        bench.say('profiling apply_inbound at the facade')
        started = time.perf_counter()
        profiler.start()
        result = apply_inbound(facade, settings)
        profiler.stop()
        seconds = time.perf_counter() - started
        if result.applied != n:
            raise RuntimeError(f'apply: {result}')
        reports.append(f'apply_inbound of {n} messages: {n / seconds:,.0f}/s under the '
                       'profiler\n' + summarise(profiler.last_session, 'facade apply (push)',
                                                tmp / 'apply.txt'))

        # 2. pcommunicate --pull, in this process
        central_url, facade_url = dbs.create('central'), dbs.create('facade')
        central, facade = dbs.engine(central_url), dbs.engine(facade_url)
        create_tables(central)
        create_tables(facade)
        port = bench.free_port()
        facade_ini = bench.write_ini(tmp / 'facade.ini',
                                     bench.app_settings(facade_url, 'facade', batch), port)
        server = bench.FacadeServer(facade_ini, port, tmp / 'facade.log').start()
        central_ini = bench.write_ini(tmp / 'central.ini', bench.app_settings(
            central_url, 'central', batch, **{'communicator.base_uri': server.url}))
        bench.say(f'creating {n} tags at the facade')
        bench.create_tags(facade, 'f', n)
        from pyramid_communicator.scripts.pcommunicate import main as pcommunicate
        bench.say('profiling pcommunicate --pull')
        profiler = Profiler(interval=0.001)
        started = time.perf_counter()
        profiler.start()
        status = pcommunicate(['pcommunicate', str(central_ini), '--pull'])
        profiler.stop()
        seconds = time.perf_counter() - started
        if status != 0 or bench.count(central, 'tags') != n:
            raise RuntimeError(f'pull: status {status}, {bench.count(central, "tags")} tags')
        reports.append(f'pcommunicate --pull of {n} messages: {n / seconds:,.0f}/s under the '
                       'profiler\n' + summarise(profiler.last_session, 'pcommunicate --pull',
                                                tmp / 'pull.txt'))
    finally:
        bench.clean_up(server, dbs, tmp)
    print(f'backend {args.db}, N={n}, batch_size={batch}, commit {bench.git_commit()} '
          f'(sources sha1 {bench.source_fingerprint()})')
    print('\n\n'.join(reports))
    print(f'\nfull trees: {tmp}/apply.txt, {tmp}/pull.txt')
    return 0


if __name__ == '__main__':
    sys.exit(main())
