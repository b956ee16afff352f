"""Message format versions: every message we send says its ``"format"``;
the gem's say none (format 1).  A message of a newer format than the
receiver knows is kept pending, neither applied nor failed nor dropped,
shown as ``waiting_upgrade``, holds back later messages of its record,
and is applied by the first run after the receiver is upgraded.

The upgrade is simulated by raising ``wire.FORMAT_VERSION``: in process
for the server under WebTest, and for ``pcommunicate`` by running it
through a one-line wrapper that raises it first.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import Central, Side
from sqlalchemy import text
from test_end_to_end import central_post, posts_by_title, summary
from test_views import basic, post_messages, record

from pyramid_communicator import wire

FUTURE = 99


def upgraded_pcommunicate(central: Central, *args: str) -> subprocess.CompletedProcess:
    """``pcommunicate`` of a version that knows format ``FUTURE``."""
    code = ('import sys; import pyramid_communicator.wire as wire; '
            f'wire.FORMAT_VERSION = {FUTURE}; '
            'from pyramid_communicator.scripts.pcommunicate import main; '
            'sys.exit(main(sys.argv))')
    return subprocess.run([sys.executable, '-c', code, str(central.ini), *args],
                          capture_output=True, text=True, timeout=120)


def status_json(central: Central) -> dict:
    return json.loads(central.sync('--status', '--json'))


def inbound(side: Side) -> dict[int, dict]:
    return {row['remote_id']: row for row in side.rows('inbound_messages')}


def untouched(row: dict) -> bool:
    """Pending as it arrived: not applied, not failed, not refused."""
    return (row['processed_at'], row['failed_at'], row['refused_at'], row['attempts'],
            row['last_error']) == (None, None, None, 0, None)


# -- what we send ----------------------------------------------------------------

def test_published_messages_are_stored_and_sent_in_the_current_format(pair, webapp):
    central, facade = pair
    central_post(central, title='from central')
    [row] = central.side.rows('outbound_messages')
    assert row['format'] == wire.RECORD_FORMAT == 2

    central.sync('--push')  # a real POST body of our client
    [stored] = facade.side.rows('inbound_messages')
    assert stored['format'] == 2 and stored['processed_at'] is not None

    facade.create_post(title='from the facade')  # a GET answer of our server
    served = json.loads(webapp(facade.side).get('/messages.json?from_id=1&pending=1',
                                                headers=basic()).body)
    assert [m['format'] for m in served] == [2]


def test_a_row_from_before_the_column_is_sent_as_format_1(make_side, webapp):
    facade = make_side('facade')
    with facade.engine.begin() as conn:  # the server default, as a migration leaves it
        conn.execute(text('INSERT INTO outbound_messages (body, created_at) '
                          "VALUES ('{\"post\":{\"title\":\"old\"}}', CURRENT_TIMESTAMP)"))
    [served] = json.loads(webapp(facade).get('/messages.json?from_id=1',
                                             headers=basic()).body)
    assert served['format'] == 1


def test_a_gem_message_without_format_is_format_1_and_applied(make_side, webapp):
    facade = make_side('facade')
    app = webapp(facade, **{'communicator.gem_peer': 'true'})
    response = post_messages(app, [{'id': 1, 'body': record('gem post'),
                                     'origin': 'central', 'original_id': 3}])
    assert response.status_int == 202
    [row] = facade.rows('inbound_messages')
    assert row['format'] == 1 and row['processed_at'] is not None
    assert [p['title'] for p in facade.rows('posts')] == ['gem post']


@pytest.mark.parametrize('bad', ['2', 0, -1, 1.5, True, [2]])
def test_a_malformed_format_is_refused_alone(make_side, webapp, bad):
    facade = make_side('facade')
    response = post_messages(webapp(facade), [{'id': 1, 'body': record(), 'origin': None,
                                               'original_id': None, 'format': bad}])
    assert response.status_int == 202
    assert response.json == {'received': 1, 'refused': 1}
    [row] = facade.rows('inbound_messages')
    assert row['refused_at'] is not None and row['processed_at'] is None
    assert row['last_error'] == 'refused: "format" must be a positive integer'
    assert facade.count('posts') == 0


# -- a newer format at a server (WebTest) ------------------------------------------

@pytest.mark.slow
def test_newer_format_waits_at_the_server_until_it_is_upgraded(make_side, webapp,
                                                               make_central, monkeypatch):
    facade = make_side('facade')
    app = webapp(facade, **{'communicator.gem_peer': 'true'})
    # Post (central, 7) is created in format 99, then updated in format 2;
    # post (central, 8) has nothing to do with it.  No versions: the later
    # message overwrites, so the order of applying shows in the result.
    response = post_messages(app, [
        {'id': 1, 'body': record('v1'), 'origin': 'central', 'original_id': 7,
         'format': FUTURE},
        {'id': 2, 'body': record('v2'), 'origin': 'central', 'original_id': 7, 'format': 2},
        {'id': 3, 'body': record('other'), 'origin': 'central', 'original_id': 8,
         'format': 2},
    ], headers={**basic(), wire.NAME_HEADER: 'central'})
    assert response.status_int == 202

    rows = inbound(facade)
    assert rows[1]['format'] == FUTURE and untouched(rows[1])
    assert untouched(rows[2])  # waits behind message 1: same record
    assert rows[3]['processed_at'] is not None
    assert [p['title'] for p in facade.rows('posts')] == ['other']

    # Later requests retry nothing and fail nothing.
    assert post_messages(app, []).status_int == 202
    assert untouched(inbound(facade)[1]) and untouched(inbound(facade)[2])

    operator = make_central(facade, None)  # pcommunicate facade.ini --status
    status = status_json(operator)['inbound']
    assert (status['pending'], status['waiting_upgrade'], status['failed']) == (2, 1, 0)
    assert '1 waiting for an upgrade' in operator.sync('--status')

    monkeypatch.setattr(wire, 'FORMAT_VERSION', FUTURE)  # the server is upgraded
    assert post_messages(app, []).status_int == 202  # its next request applies
    assert all(row['processed_at'] is not None for row in inbound(facade).values())
    assert sorted(p['title'] for p in facade.rows('posts')) == ['other', 'v2']
    monkeypatch.undo()
    assert status_json(operator)['inbound']['waiting_upgrade'] == 0


def test_newer_format_is_stored_even_where_our_rules_would_refuse_it(make_side, webapp):
    """What a future format says in ``refs``, ``version`` or the body is
    its own business: stored for the upgraded version to read."""
    facade = make_side('facade')
    app = webapp(facade)
    strange = {'id': 1, 'body': '{"post": "a list, some day"}', 'origin': 'central',
               'original_id': 7, 'refs': ['new', 'shape'], 'version': {'v': 9}}
    refused = post_messages(app, [{**strange, 'format': 2}])
    assert refused.status_int == 202 and refused.json['refused'] == 1
    assert post_messages(app, [{**strange, 'id': 2, 'format': FUTURE}]).status_int == 202
    [mine, row] = facade.rows('inbound_messages')
    assert mine['refused_at'] is not None  # format 2 is ours: its rules apply
    assert row['format'] == FUTURE and untouched(row)
    assert json.loads(row['refs']) == ['new', 'shape']
    assert json.loads(row['version']) == {'v': 9}


# -- a newer format pulled over real HTTP by pcommunicate ---------------------------

@pytest.mark.slow
def test_newer_format_pulled_by_pcommunicate_waits_and_applies_after_upgrade(pair):
    central, facade = pair
    post = facade.create_post(title='one')
    with facade.side.engine.begin() as conn:  # the facade runs a newer version
        conn.execute(text('UPDATE outbound_messages SET format = :f'), {'f': FUTURE})
    facade.update_post(post['id'], title='two')  # same record, current format
    facade.create_post(title='unrelated')

    result = central.pcommunicate()
    assert result.returncode == 0, result.stderr
    assert summary(result.stdout) == dict(pushed=0, pulled=3, applied=1, failed=0, waiting=2)
    assert '1 inbound messages are of a newer format' in result.stderr  # for cron's mail
    assert set(posts_by_title(central.side)) == {'unrelated'}
    formats = sorted(row['format'] for row in central.side.rows('inbound_messages'))
    assert formats == [2, 2, FUTURE]
    status = status_json(central)['inbound']
    assert (status['pending'], status['waiting_upgrade'], status['failed']) == (2, 1, 0)
    assert '1 waiting for an upgrade' in central.sync('--status')

    # The same central, still not upgraded: nothing changes, nothing fails.
    assert summary(central.sync()) == dict(pushed=0, pulled=0, applied=0, failed=0,
                                           waiting=2)

    upgraded = upgraded_pcommunicate(central)
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert summary(upgraded.stdout) == dict(pushed=0, pulled=0, applied=2, failed=0,
                                            waiting=0)
    assert set(posts_by_title(central.side)) == {'unrelated', 'two'}
    assert central.side.count('inbound_messages', 'processed_at IS NULL') == 0
    assert status_json(central)['inbound']['waiting_upgrade'] == 0


def test_newer_format_pushed_to_a_real_server_waits_there(pair):
    central, facade = pair
    central_post(central, title='from the future')
    with central.side.engine.begin() as conn:
        conn.execute(text('UPDATE outbound_messages SET format = :f'), {'f': FUTURE})
    assert summary(central.sync('--push'))['pushed'] == 1
    [row] = facade.side.rows('inbound_messages')
    assert row['format'] == FUTURE and untouched(row)
    assert facade.side.count('posts') == 0
