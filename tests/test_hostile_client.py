"""Central against a hostile facade (issue 14): whatever a broken-into
facade answers, ``pcommunicate`` ends within bounds of time and memory,
with one line saying what happened, follows no redirect, stores nothing
of a refused reply and prints nothing a terminal acts on.

The facade is :mod:`hostile`'s raw-socket server on loopback.  Times are
checked with generous bounds only: a bound missed means a run that hangs,
not a slow machine.
"""
from __future__ import annotations

import json
import time

import pytest
from conftest import versioned
from hostile import (
    drip,
    gzip_bomb,
    head,
    hostile_server,
    huge,
    json_reply,
    plain_push,
    redirect,
)
from test_pcommunicate import error_line, run

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post

TIMEOUT = 2
CAP = 1024 * 1024
#: Central's settings in these tests: a short timeout, a small cap.
SETTINGS = {'communicator.timeout': str(TIMEOUT), 'communicator.max_body_bytes': str(CAP)}


@pytest.fixture
def central_for(make_side, make_central):
    """``central_for(url, **settings)``: central pointed at ``url``, with a
    post of its own waiting in its outbound queue."""
    def make(url: str, **overrides: str):
        central = make_central(make_side('central'), url, **{**SETTINGS, **overrides})
        with central.side.session() as session:
            post = Post(title='kept at home')
            session.add(post)
            session.flush()
            publish(session, post)
        return central
    return make


def unchanged(central) -> None:
    """Central's database as before the run: its message still waiting,
    nothing received, no post added."""
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 1
    assert central.side.count('inbound_messages') == 0
    assert central.side.count('posts') == 1


def timed_run(central, *args: str):
    started = time.monotonic()
    result = run(central, *args)
    return result, time.monotonic() - started


def pull_answers(reply):
    """A facade that takes pushes and answers each pull with ``reply()``."""
    def handler(request):
        return plain_push(request) or reply()
    return handler


# -- redirects ------------------------------------------------------------------

def test_a_redirect_of_the_push_is_not_followed(central_for):
    with hostile_server(lambda request: []) as elsewhere, \
            hostile_server(lambda request: redirect(elsewhere.url + '/messages.json')) as facade:
        central = central_for(facade.url)
        result = run(central)
    assert result.returncode == 1
    line = error_line(result)
    assert 'HTTP 307' in line and elsewhere.url in line and 'not followed' in line
    assert elsewhere.requests == []  # our records went nowhere else
    assert [r.method for r in facade.requests] == ['POST']
    unchanged(central)


def test_a_redirect_of_the_pull_is_not_followed(central_for):
    with hostile_server(lambda request: []) as elsewhere, \
            hostile_server(pull_answers(lambda: redirect(elsewhere.url + '/x', '302 Found'))
                           ) as facade:
        central = central_for(facade.url, **{'communicator.batch_size': '1'})
        result = run(central, '--pull')
    assert result.returncode == 1
    assert 'HTTP 302' in error_line(result)
    assert elsewhere.requests == []


def test_a_location_with_escape_codes_is_shown_escaped_and_cut(central_for):
    location = 'http://evil.example/\x1b[2J' + 'a' * 5000
    with hostile_server(lambda request: redirect(location)) as facade:
        central = central_for(facade.url)
        result = run(central)
    line = error_line(result)
    assert '\x1b' not in line and '\\x1b[2J' in line
    assert len(line) < 600


# -- time -----------------------------------------------------------------------

@pytest.mark.parametrize('in_headers', [False, True], ids=['body', 'headers'])
def test_a_drip_is_cut_at_the_timeout(central_for, in_headers):
    """One byte every half second never trips a timeout per read; the
    whole reply must still come within ``communicator.timeout``."""
    with hostile_server(pull_answers(lambda: drip(0.5, in_headers))) as facade:
        central = central_for(facade.url)
        result, seconds = timed_run(central, '--pull')
    assert result.returncode == 1
    assert error_line(result).endswith(f'did not answer within {TIMEOUT} seconds')
    assert seconds < 30
    unchanged(central)


def test_a_drip_of_the_push_is_cut_and_nothing_is_marked_delivered(central_for):
    with hostile_server(lambda request: drip(0.5)) as facade:
        central = central_for(facade.url)
        result, seconds = timed_run(central, '--push')
    assert result.returncode == 1
    assert 'did not answer within' in error_line(result)
    assert seconds < 30
    unchanged(central)


def test_the_next_run_is_not_kept_out_by_a_drip(central_for):
    """The drip once held the run lock for ever, and every later run
    exited 0 saying another run held it."""
    with hostile_server(pull_answers(lambda: drip(0.5))) as facade:
        central = central_for(facade.url)
        first = run(central, '--pull')
        second = run(central, '--pull')
    assert 'holds the lock' not in second.stdout + second.stderr
    assert first.returncode == second.returncode == 1


# -- size -------------------------------------------------------------------------

@pytest.mark.parametrize('reply, words', [
    (lambda: huge(64 * CAP), f'reply over {CAP} bytes'),
    (lambda: huge(64 * CAP, content_length=True), f'reply over {CAP} bytes'),
    (lambda: gzip_bomb(256 * CAP), f'reply over {CAP} bytes once decompressed'),
], ids=['huge, streamed', 'huge, announced', 'gzip bomb'])
def test_a_reply_past_the_cap_is_refused_without_holding_it(central_for, reply, words):
    with hostile_server(pull_answers(reply)) as facade:
        central = central_for(facade.url)
        result, seconds = timed_run(central, '--pull')
    assert result.returncode == 1
    assert words in error_line(result)
    assert seconds < 60
    unchanged(central)


def test_an_unknown_content_encoding_is_refused(central_for):
    def reply():
        return [head(Content_Encoding='br', Content_Length=2), b'[]']
    with hostile_server(pull_answers(reply)) as facade:
        central = central_for(facade.url)
        result = run(central, '--pull')
    assert result.returncode == 1
    assert 'Content-Encoding' in error_line(result)


def test_a_gzip_reply_within_the_cap_is_read():
    """The cap refuses bombs, not compression: a gzip reply of our own
    server's kind is read as before (``test_compression`` has the rest)."""
    import gzip

    from pyramid_communicator.client import Client
    from pyramid_communicator.settings import parse_settings

    body = gzip.compress(json.dumps([]).encode())
    with hostile_server(lambda request: [head(Content_Encoding='gzip',
                                              Content_Length=len(body),
                                              X_Communicator_Name='facade',
                                              X_Communicator_Protocol=2), body]) as facade:
        client = Client(parse_settings({'communicator.name': 'central',
                                        'communicator.username': 'u',
                                        'communicator.password': 'p',
                                        'communicator.base_uri': facade.url}))
        try:
            reply = client.pull(1)
        finally:
            client.close()
    assert reply.messages == [] and reply.sender == 'facade'


# -- who the peer says it is --------------------------------------------------------

@pytest.mark.parametrize('name', ['x' * 20000, 'fa\x1bcade', 'central'],
                         ids=['long', 'escape', 'ours'])
def test_a_pull_from_a_peer_with_a_bad_name_is_refused(central_for, name):
    message = {'id': 1, 'body': json.dumps({'post': {'title': 'planted'}}),
               'origin': 'facade', 'original_id': 1}
    with hostile_server(pull_answers(lambda: json_reply(
            [message], X_Communicator_Name=name, X_Communicator_Protocol=2))) as facade:
        central = central_for(facade.url)
        result = run(central, '--pull')
    assert result.returncode == 1
    line = error_line(result)
    assert 'X-Communicator-Name' in line or "this app's own" in line
    assert '\x1b' not in line and len(line) < 600
    unchanged(central)


# -- run_seconds ----------------------------------------------------------------------

def endless_facade():
    """A facade that always has one more message (the next id each time),
    after a short pause: a pull would never end."""
    served = []

    def handler(request):
        if request.method == 'POST':  # a push, or an acknowledgement
            return json_reply([], X_Communicator_Protocol=2, X_Communicator_Name='facade')
        served.append(len(served) + 1)
        n = served[-1]
        message = versioned({'id': n, 'body': json.dumps({'post': {'title': f'endless {n}'}}),
                             'origin': 'facade', 'original_id': n}, 'facade')
        return [0.2, *json_reply([message], X_Communicator_Protocol=2,
                                 X_Communicator_Name='facade', X_Communicator_More=1)]
    return handler


def test_a_run_stops_at_run_seconds_with_exit_0_and_the_next_goes_on(central_for):
    with hostile_server(endless_facade()) as facade:
        central = central_for(facade.url, **{'communicator.run_seconds': '1'})
        first, seconds = timed_run(central)
        after_first = central.side.count('inbound_messages')
        second = run(central)
    assert first.returncode == 0, first.stderr
    assert 'stopped_early=1' in first.stdout
    assert 'run_seconds' in first.stderr  # the warning says why
    assert seconds < 60
    assert 1 <= after_first
    assert central.side.count('inbound_messages') > after_first  # went on
    assert central.side.count('posts') == 1 + central.side.count('inbound_messages')
    assert second.returncode == 0
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0


# -- --status ---------------------------------------------------------------------------

JUNK_STATUSES = {
    'missing': {'outbound': {}},
    'wrong_types': {'name': ['x'], 'outbound': {'pending': 'many', 'total': None,
                                                'oldest_pending_age_seconds': 'old'},
                    'inbound': [1, 2], 'conflicts': 'none', 'last_exchanges': {'a': 5},
                    'last_run': {'at': {'x': 1}, 'result': 7},
                    'failures': ['boom', {'id': 'x', 'error': ['nested']}]},
    'escapes': {'name': 'fa\x1b]0;owned\x07cade\u202e', 'outbound': {'pending': 1},
                'inbound': {'pending': 0, 'total': 0, '\x1b[2Jkey': 3},
                'last_run': {'at': 'now', 'result': '\x9b31m' + 'z' * 100000},
                'failures': [{'id': 1, 'refused': False, 'sender': '\x1bs',
                              'error': '\x1b[1Aline\nsecond', 'remote_id': 1,
                              'attempts': 1}] * 1000,
                'last_exchanges': {f'k{i}': {'at': 'x', 'peer': '\ud800'} for i in range(500)}},
    'nested': {'outbound': {'pending': [[[[[[[[[[{}]]]]]]]]]]}, 'inbound': {'pending': {}},
               'conflicts': {'latest': [[[]]]}},
}


@pytest.mark.parametrize('kind', JUNK_STATUSES)
def test_status_copes_with_any_status_reply(central_for, kind):
    status = JUNK_STATUSES[kind]
    with hostile_server(lambda request: json_reply(status)) as facade:
        central = central_for(facade.url)
        text = run(central, '--status')
        as_json = run(central, '--status', '--json')
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    for output in (text.stdout, as_json.stdout):
        assert not any(char in output for char in '\x1b\x07\x9b\u202e')
        assert not any(0xd800 <= ord(char) <= 0xdfff for char in output)
    peer = text.stdout.split('\n\n', 1)[1]
    assert all(len(line) < 1000 for line in peer.splitlines())
    assert len(peer.splitlines()) < 300
    assert json.loads(as_json.stdout)['peer']['state'] == 'ok'
    if kind == 'missing':
        assert 'inbound:  not reported' in peer and 'conflicts: not reported' in peer
        assert 'outbound: ? pending' in peer
    if kind == 'escapes':
        assert '\\x1b' in peer and '\\u202e' in peer


def test_status_of_a_peer_sending_junk_is_one_line(central_for):
    with hostile_server(lambda request: [head(Content_Length=5000), b'[' * 5000]) as facade:
        central = central_for(facade.url)
        result = run(central, '--status')
    assert result.returncode == 1
    assert 'invalid reply' in error_line(result)


def test_drain_names_a_peer_with_escape_codes_safely(central_for):
    status = {'name': '\x1b[31mred', 'outbound': {'pending': 'lots'}, 'inbound': {}}

    def handler(request):
        if request.path.startswith('/status.json'):
            return json_reply(status)
        return plain_push(request) or json_reply(
            [], X_Communicator_Protocol=2, X_Communicator_Name='facade')
    with hostile_server(handler) as facade:
        central = central_for(facade.url)
        result, seconds = timed_run(central, '--drain', '--timeout', '1')
    assert result.returncode == 1
    line = error_line(result)
    assert '\x1b' not in line and '\\x1b[31mred: ? outbound pending' in line
    assert seconds < 60
