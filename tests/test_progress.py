"""Progress of long runs: bars on stderr when it is a terminal (run under
a real pseudo-terminal here), the one summary line otherwise (cron), and
nothing but errors with ``--quiet``."""
from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from urllib.parse import parse_qs

import pytest
from conftest import BIN, Central, free_port
from fakes import read_body, serve_wsgi
from test_pcommunicate import SUMMARY, checked, error_line, run
from test_seeding import insert_posts

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post


def publish_posts(side, count: int) -> None:
    with side.session() as session:
        for number in range(count):
            post = Post(title=f'{side.name} {number}')
            session.add(post)
            session.flush()
            publish(session, post)


def on_terminal(central: Central, *args: str, rows: int = 24,
                columns: int = 100) -> tuple[subprocess.CompletedProcess, str]:
    """Run pcommunicate with stderr on a pseudo-terminal of that size;
    stdout stays a pipe.  Returns the run and what the terminal showed."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', rows, columns, 0, 0))
    process = subprocess.Popen([str(BIN / 'pcommunicate'), str(central.ini), *args],
                               stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    shown = b''
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if not ready:
                if process.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        stdout = process.communicate(timeout=max(deadline - time.monotonic(), 1))[0]
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
    result = subprocess.CompletedProcess(process.args, process.returncode,
                                         stdout.decode(), shown.decode())
    return checked(result), shown.decode()


def final_state(shown: str, label: str) -> str:
    """The last drawing of a bar: what stays on the terminal."""
    drawings = [part for part in re.split(r'[\r\n]+', shown) if part.startswith(label + ':')]
    assert drawings, shown
    return drawings[-1]


#: [elapsed<time left, rate]
RATE = r'\[\d\d:\d\d<\d\d:\d\d, +[\d.]+ messages/s\]'


def test_terminal_shows_push_pull_and_apply_progress(pair):
    central, facade = pair
    publish_posts(central.side, 120)  # three batches of 50
    publish_posts(facade.side, 60)

    result, shown = on_terminal(central)

    assert result.returncode == 0, shown
    assert re.fullmatch(r'push: 100%\|█+\| 120/120 ' + RATE, final_state(shown, 'push').strip())
    # The pull's total comes from the facade's /status.json.
    assert re.fullmatch(r'pull: 100%\|█+\| 60/60 ' + RATE, final_state(shown, 'pull').strip())
    assert re.fullmatch(r'apply: 100%\|█+\| 60/60 ' + RATE, final_state(shown, 'apply').strip())
    # stdout is no terminal: the summary line as ever.
    [line] = result.stdout.splitlines()
    assert SUMMARY.fullmatch(line)
    assert line.startswith('pushed=120 pulled=60 applied=60 failed=0 waiting=0 ')


def test_terminal_that_reports_no_size_still_shows_progress(pair):
    central, facade = pair
    publish_posts(central.side, 3)
    result, shown = on_terminal(central, rows=0, columns=0)
    assert result.returncode == 0
    assert '3/3' in final_state(shown, 'push')


def test_pull_from_a_peer_without_status_counts_without_a_total(make_side, make_central):
    """The gem serves no /status.json: the pull shows done and rate."""
    messages = [{'id': number, 'body': json.dumps({'post': {'title': f'gem {number}'}}),
                 'origin': 'gem', 'original_id': number} for number in range(1, 5)]

    def gem_with_messages(environ, start_response):
        read_body(environ)
        if environ['PATH_INFO'] != '/messages.json':
            start_response('404 Not Found', [('Content-Type', 'text/html')])
            return [b'Not Found']
        from_id = int(parse_qs(environ['QUERY_STRING']).get('from_id', ['0'])[0])
        start_response('200 OK', [('Content-Type', 'text/html')])
        return [json.dumps([m for m in messages if m['id'] >= from_id]).encode()]

    with serve_wsgi(gem_with_messages) as url:
        central = make_central(make_side('central'), url,
                               **{'communicator.gem_peer': 'true'})
        result, shown = on_terminal(central, '--pull')
    assert result.returncode == 0, shown
    assert re.fullmatch(r'pull: 4 messages \[\d\d:\d\d, +[\d.]+ messages/s\]',
                        final_state(shown, 'pull').strip()), shown
    assert central.side.count('posts') == 4


def test_cron_gets_one_summary_line_and_nothing_on_stderr(pair):
    central, facade = pair
    publish_posts(central.side, 120)
    publish_posts(facade.side, 60)

    result = run(central)  # stderr is a pipe, as under cron

    assert result.returncode == 0
    assert result.stderr == ''
    [line] = result.stdout.splitlines()
    assert line.startswith('pushed=120 pulled=60 applied=60 failed=0 waiting=0 ')


def test_quiet_shows_neither_progress_nor_summary(pair):
    central, facade = pair
    publish_posts(central.side, 60)

    result, shown = on_terminal(central, '--quiet')

    assert result.returncode == 0
    assert shown == '' and result.stdout == ''
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert facade.side.count('posts') == 60


def test_quiet_still_reports_errors_with_the_same_exit_status(make_side, make_central):
    url = f'http://127.0.0.1:{free_port()}'
    central = make_central(make_side('central'), url)
    result = run(central, '--quiet')
    assert result.returncode == 1
    assert error_line(result).startswith(f'pcommunicate: cannot reach {url}')
    assert result.stdout == ''


def test_publish_all_shows_its_progress_with_the_same_bars(pair):
    central, _ = pair
    insert_posts(central.side, 120)

    result, shown = on_terminal(central, '--publish-all', 'post')

    assert result.returncode == 0
    assert re.fullmatch(r'post: 100%\|█+\| 120/120 \[\d\d:\d\d<\d\d:\d\d, +[\d.]+ records/s\]',
                        final_state(shown, 'post').strip()), shown
    assert result.stdout.strip() == 'published 120 post record(s)'


@pytest.mark.parametrize('args', [(), ('--drain',)], ids=['run', 'drain'])
def test_quiet_drain_and_run_print_nothing_when_all_is_well(pair, args):
    central, facade = pair
    facade.create_post(title='one')
    result = run(central, *args, '--quiet')
    assert result.returncode == 0, result.stderr
    assert (result.stdout, result.stderr) == ('', '')
    assert central.side.count('posts') == 1
