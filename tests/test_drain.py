"""``pcommunicate --drain`` before an upgrade: it exchanges until both
sides are empty (exit 0), or names what is left and where (exit 1)."""
from __future__ import annotations

import json
import re

import pytest
from fakes import read_body, serve_wsgi
from test_pcommunicate import error_line, fix_failure, make_failure, run
from test_status import failure_at_the_facade, gem_like_peer

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post

DRAINED = re.compile(r'drained: nothing pending and nothing failed on either side '
                     r'\(exchanges=\d+ pushed=(\d+) pulled=(\d+) applied=(\d+)\)')


def drain_error(result) -> str:
    """The one ``pcommunicate:`` line; other lines may only be the app's
    log (a failure retried during the drain logs a warning)."""
    lines = result.stderr.strip().splitlines()
    ours = [line for line in lines if line.startswith('pcommunicate: ')]
    assert len(ours) == 1, result.stderr
    assert all(line.startswith('WARNING [') for line in lines if line not in ours), lines
    return ours[0]


def publish_posts(side, count: int, prefix: str) -> None:
    with side.session() as session:
        for number in range(count):
            post = Post(title=f'{prefix} {number}')
            session.add(post)
            session.flush()
            publish(session, post)


def test_drain_empties_both_sides_and_exits_0(pair):
    central, facade = pair
    publish_posts(central.side, 120, 'central')  # batches of 50
    publish_posts(facade.side, 70, 'facade')

    result = run(central, '--drain')

    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    [line] = result.stdout.splitlines()
    match = DRAINED.fullmatch(line)
    assert match, line
    assert tuple(map(int, match.groups())) == (120, 70, 70)
    for side in (central.side, facade.side):
        assert side.count('outbound_messages', 'delivered_at IS NULL') == 0
        assert side.count('inbound_messages', 'processed_at IS NULL') == 0
        assert side.count('posts') == 190
    # Already drained: one exchange says so.
    again = run(central, '--drain', '--timeout', '0')
    assert again.returncode == 0, again.stderr
    assert DRAINED.fullmatch(again.stdout.strip()).groups() == ('0', '0', '0')


def test_drain_names_a_failure_left_at_the_facade(pair):
    central, facade = pair
    failure_at_the_facade(central, facade)
    publish_posts(central.side, 2, 'more')

    result = run(central, '--drain')

    assert result.returncode == 1
    line = drain_error(result)
    assert line.startswith('pcommunicate: not drained: ')
    assert re.search(r'facade: 1 inbound pending, 1 failed \(id 1: IntegrityError', line), line
    assert 'central:' not in line  # central's side is empty
    assert result.stdout == ''
    # What could go, went.
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    assert facade.side.count('posts', "title LIKE 'more %'") == 2


@pytest.mark.slow
def test_drain_names_a_failure_left_at_central_and_drains_once_fixed(pair):
    central, facade = pair
    failed_id = make_failure(central, facade)

    result = run(central, '--drain', '--timeout', '60')
    assert result.returncode == 1
    assert re.search(rf'central: 1 inbound pending, 1 failed \(id {failed_id}: '
                     r'IntegrityError', drain_error(result))

    fix_failure(central)
    result = run(central, '--drain')
    assert result.returncode == 0, result.stderr
    assert DRAINED.fullmatch(result.stdout.strip())


@pytest.mark.slow
def test_drain_times_out_naming_what_is_left(make_side, serve, make_central):
    """A facade that never applies what it receives: pending, not failed,
    so the drain waits, boundedly, then says what is left."""
    facade = serve(make_side('facade'), **{'communicator.apply_on_receive': 'false'})
    central = make_central(make_side('central'), facade.url)
    publish_posts(central.side, 3, 'stays pending')

    result = run(central, '--drain', '--timeout', '1')

    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith('pcommunicate: not drained: timeout after 1s; ')
    assert line.endswith('facade: 3 inbound pending'), line
    assert facade.side.count('inbound_messages', 'processed_at IS NULL') == 3


def test_drain_against_a_peer_without_status_cannot_succeed(make_side, make_central):
    with serve_wsgi(gem_like_peer) as url:
        central = make_central(make_side('central'), url)
        result = run(central, '--drain')
    assert result.returncode == 1
    assert f'peer {url}: status not available' in error_line(result)


def test_messages_waiting_for_an_upgrade_count_as_left(make_side, make_central):
    """A newer facade holding messages of a format it cannot apply yet
    reports them as ``waiting_upgrade``: not drained."""
    status = {'name': 'facade', 'outbound': {'pending': 0, 'total': 0},
              'inbound': {'pending': 2, 'failed': 0, 'waiting_upgrade': 2, 'total': 2},
              'failures': [], 'conflicts': {'recent': 0, 'recent_hours': 24, 'total': 0,
                                            'latest': []},
              'last_exchanges': {}}

    def newer_facade(environ, start_response):
        read_body(environ)
        path = environ['PATH_INFO']
        headers = [('Content-Type', 'application/json'), ('X-Communicator-Name', 'facade'),
                   ('X-Communicator-Protocol', '2')]
        start_response('200 OK', headers)
        if path == '/status.json':
            return [json.dumps(status).encode()]
        if environ['REQUEST_METHOD'] == 'GET':
            return [b'[]']
        return [b'{}']

    with serve_wsgi(newer_facade) as url:
        central = make_central(make_side('central'), url)
        result = run(central, '--drain')
    assert result.returncode == 1
    assert error_line(result).endswith(
        'facade: 2 inbound pending, 2 waiting for an upgrade')


def test_timeout_goes_with_drain_only(make_side, make_central):
    central = make_central(make_side('central'), 'http://127.0.0.1:9')
    result = run(central, '--timeout', '5')
    assert result.returncode == 2
    assert '--timeout' in error_line(result)
