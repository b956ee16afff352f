"""``pcommunicate`` as operators meet it: run as a subprocess against
real ini files, judged by its exit status, its output and what it did to
the database.

Every run goes through :func:`checked`, which insists on what must hold
for every run: no traceback and no password in the output; a failure is
read through :func:`error_line`, which insists on one line.
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import BIN, PASSWORD, Central, Server, free_port
from sqlalchemy import text

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post

SUMMARY = re.compile(r'pushed=\d+ pulled=\d+ applied=\d+ failed=\d+ waiting=\d+ '
                     r'seconds=\d+\.\d\d')
OTHER_PASSWORD = 'n0t-the-same-pass'


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """What every run must show, whatever happened: no traceback and no
    password, on stdout or stderr."""
    output = result.stdout + result.stderr
    assert 'Traceback' not in output, output
    assert PASSWORD not in output and OTHER_PASSWORD not in output, output
    return result


def run(central: Central, *args: str) -> subprocess.CompletedProcess:
    return checked(central.pcommunicate(*args))


def run_ini(ini: Path | str, *args: str) -> subprocess.CompletedProcess:
    return checked(subprocess.run([str(BIN / 'pcommunicate'), str(ini), *args],
                                  capture_output=True, text=True, timeout=120))


def error_line(result: subprocess.CompletedProcess) -> str:
    """The failure as an operator reads it: one line, naming the program."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('pcommunicate: '), result.stderr
    return lines[0]


def make_failure(central: Central, facade: Server) -> int:
    """A message central cannot apply: the facade's post takes a slug that
    a central post already has.  Returns the failed inbound message's id."""
    with central.side.session() as session:
        session.add(Post(title='Central own', slug='dup'))
    facade.create_post(title='Facade conflicting', slug='dup')
    result = run(central)
    assert result.returncode == 0, result.stderr
    [row] = central.side.rows('inbound_messages')
    assert row['failed_at'] is not None and row['processed_at'] is None
    return row['id']


def fix_failure(central: Central) -> None:
    with central.side.engine.begin() as conn:
        conn.execute(text("UPDATE posts SET slug = 'dup-central' WHERE slug = 'dup'"))


def test_unreachable_peer_is_one_line_naming_the_url(make_side, make_central):
    url = f'http://127.0.0.1:{free_port()}'  # nothing listens there
    central = make_central(make_side('central'), url)
    with central.side.session() as session:
        post = Post(title='waiting')
        session.add(post)
        session.flush()
        publish(session, post)

    result = run(central)

    assert result.returncode == 1
    assert error_line(result).startswith(f'pcommunicate: cannot reach {url}/messages.json')
    assert result.stdout == ''
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1


def test_refused_credentials_are_one_line(make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.password': OTHER_PASSWORD})
    central = make_central(make_side('central'), facade.url)

    result = run(central)

    assert result.returncode == 1
    line = error_line(result)
    assert f'{facade.url}/messages.json refused the credentials' in line
    assert 'communicator.password' in line  # what to check, not its value
    assert result.stdout == ''
    assert facade.side.count('inbound_messages') == 0
    log = facade.log.read_text()
    assert PASSWORD not in log and OTHER_PASSWORD not in log


def test_bad_ini_paths_exit_2_with_one_line(tmp_path):
    missing = tmp_path / 'nowhere.ini'
    result = run_ini(missing)
    assert result.returncode == 2
    assert str(missing) in error_line(result)

    no_app = tmp_path / 'no-app.ini'
    no_app.write_text('[server:main]\nuse = egg:waitress#main\n')
    result = run_ini(no_app)
    assert result.returncode == 2
    assert error_line(result).startswith('pcommunicate: ')
    assert result.stdout == ''


def test_summary_is_one_line(pair):
    central, facade = pair
    with central.side.session() as session:
        post = Post(title='from central')
        session.add(post)
        session.flush()
        publish(session, post)
    facade.create_post(title='from the facade')

    result = run(central)

    assert result.returncode == 0
    assert result.stderr == ''
    [line] = result.stdout.splitlines()
    assert SUMMARY.fullmatch(line), line
    assert line.startswith('pushed=1 pulled=1 applied=1 failed=0 waiting=0 seconds=')


@pytest.mark.slow
def test_status_shows_a_failure_that_give_up_then_stops(pair):
    """The operator's round: --status shows the failure, --give-up records
    who and why and ends the retries, --retry ID revives it once fixed."""
    central, facade = pair
    failed_id = make_failure(central, facade)
    with central.side.session() as session:  # one more, not yet pushed
        post = Post(title='pending')
        session.add(post)
        session.flush()
        publish(session, post)

    result = run(central, '--status', '--json')
    assert result.returncode == 0 and result.stderr == ''
    report = json.loads(result.stdout)
    assert {'outbound', 'inbound', 'failures', 'last_exchanges'} <= set(report)
    assert (report['outbound']['pending'], report['outbound']['total']) == (1, 1)
    assert report['outbound']['oldest_pending_age_seconds'] >= 0
    assert (report['inbound']['pending'], report['inbound']['failed'],
            report['inbound']['given_up']) == (1, 1, 0)
    [failure] = report['failures']
    assert (failure['id'], failure['sender'], failure['attempts']) == (failed_id, 'facade', 1)
    assert failure['error'].startswith('IntegrityError')
    assert report['last_exchanges']['last_pull_at']['peer'] == 'facade'
    assert report['last_exchanges']['last_push_at']['at'].endswith('Z')
    assert report['last_exchanges']['last_push_at']['peer'] == 'facade'
    # --status only looks: nothing was pushed.
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1

    result = run(central, '--give-up', str(failed_id), '--reason', 'slug clash, fixed by hand',
                 '--by', 'ops-alice')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'gave up on 1 inbound message(s)'
    [row] = central.side.rows('inbound_messages')
    assert (row['given_up_by'], row['given_up_reason']) == ('ops-alice',
                                                           'slug clash, fixed by hand')
    assert row['given_up_at'] is not None

    result = run(central)
    assert result.returncode == 0
    assert result.stdout.startswith('pushed=1 pulled=0 applied=0 failed=0 waiting=0 ')
    [row] = central.side.rows('inbound_messages')
    assert (row['attempts'], row['processed_at']) == (1, None)  # not retried

    result = run(central, '--status')
    assert result.returncode == 0 and result.stderr == ''
    lines = result.stdout.splitlines()
    assert lines[0] == 'communicator central'
    assert lines[1] == 'outbound: 0 pending (oldest -), 1 in all'
    assert lines[2] == 'inbound:  0 pending (oldest -), 0 failed, 0 refused, 1 given up, 1 in all'
    assert any(re.fullmatch(r'last_push_at: \d{4}-\d\d-\d\dT[\d:.]+Z \(facade\)', line)
               for line in lines), lines
    assert any(re.fullmatch(r'last_pull_at: \S+Z \(facade\)', line) for line in lines), lines
    assert not any(line.startswith('failed #') for line in lines), lines

    # Named by id, --retry revives a given-up message.
    fix_failure(central)
    result = run(central, '--retry', str(failed_id))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'applied=1 failed=0 waiting=0'
    assert central.side.count('posts', "slug = 'dup' AND title = 'Facade conflicting'") == 1


def test_give_up_without_reason_is_a_usage_error(make_side, make_central):
    central = make_central(make_side('central'), 'http://127.0.0.1:9')
    result = run(central, '--give-up', '1')
    assert result.returncode == 2
    assert '--reason' in error_line(result)
    assert result.stdout == ''


def test_retry_applies_failed_messages_once_the_cause_is_fixed(pair):
    central, facade = pair
    failed_id = make_failure(central, facade)
    facade.stop()  # --retry works on the local queue only

    result = run(central, '--retry')
    assert result.returncode == 1
    assert result.stdout.strip() == 'applied=0 failed=1 waiting=0'

    fix_failure(central)
    result = run(central, '--retry')
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == 'applied=1 failed=0 waiting=0'
    [row] = central.side.rows('inbound_messages')
    assert row['id'] == failed_id and row['processed_at'] is not None
    assert row['last_error'] is None
    assert central.side.count('posts', "slug = 'dup' AND title = 'Facade conflicting'") == 1
