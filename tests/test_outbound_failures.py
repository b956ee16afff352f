"""Outbound messages the peer refuses for good are set aside on central
(:mod:`pyramid_communicator.outbound_failures`): the rest flows, later
messages of the same record wait, and an operator retries or gives up."""
from __future__ import annotations

import json

from fakes import read_body, serve_wsgi
from test_batches import publish_posts
from test_end_to_end import summary

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post


def edit_post(side, post_id: int, **fields) -> None:
    with side.session() as session:
        post = session.get(Post, post_id)
        for key, value in fields.items():
            setattr(post, key, value)
        session.flush()
        publish(session, post)


def counts(stdout: str) -> dict[str, int]:
    return summary(stdout.replace(' set_aside=1', ''))


def outbound(side) -> dict[int, dict]:
    return {row['id']: row for row in side.rows('outbound_messages')}


def test_an_oversized_record_is_set_aside_its_edits_wait_and_retry_sends_both(
        make_side, serve, make_central):
    facade_side = make_side('facade')
    facade = serve(facade_side, **{'communicator.max_body_bytes': 4000})
    # central does not know the facade's limit: the facade's 413 tells it
    central = make_central(make_side('central'), facade.url)
    publish_posts(central.side, 1, body='z' * 5000)  # message 1, post 1
    publish_posts(central.side, 2)                    # messages 2, 3: other records

    result = central.pcommunicate()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(' set_aside=1')
    assert counts(result.stdout)['pushed'] == 2
    assert 'set aside outbound message 1' in result.stderr
    assert 'more than the peer accepts' in result.stderr
    assert sorted(p['title'] for p in facade_side.rows('posts')) == ['post 0', 'post 1']
    assert outbound(central.side)[1]['failed_at'] is not None

    # A later edit of the same record waits behind it; other records go on.
    edit_post(central.side, 1, body='short now')          # message 4
    publish_posts(central.side, 1)                        # message 5
    assert counts(central.sync())['pushed'] == 1
    rows = outbound(central.side)
    assert rows[4]['delivered_at'] is None and rows[4]['failed_at'] is None
    assert rows[5]['delivered_at'] is not None
    assert facade_side.count('posts') == 3

    status = json.loads(central.pcommunicate('--status', '--json').stdout)
    assert (status['outbound']['pending'], status['outbound']['failed'],
            status['outbound']['given_up']) == (1, 1, 0)
    [failure] = status['outbound_failures']
    assert (failure['id'], failure['record'], failure['origin'], failure['original_id'],
            failure['attempts']) == (1, 'post', 'central', 1, 1)
    assert 'HTTP 413' not in failure['error'] and 'bytes encoded' in failure['error']
    text = central.sync('--status')
    assert 'outbound: 1 pending' in text and ', 1 set aside, ' in text
    assert 'set aside outbound #1 (post central#1, 1 attempts):' in text

    # The facade takes larger bodies now: retried, it goes, and its edit follows.
    facade.stop()
    facade = serve(facade_side, **{'communicator.max_body_bytes': 100000})
    central = make_central(central.side, facade.url)
    assert 'go again with the next push' in central.sync('--retry-outbound', '1')
    assert counts(central.sync())['pushed'] == 2
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0
    [post] = [p for p in facade_side.rows('posts') if p['title'] == 'post 0'
              and p['body'] == 'short now']
    assert post is not None


def test_give_up_files_the_message_and_lets_its_record_go_on(make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.max_body_bytes': 4000})
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.max_body_bytes': 4000})
    publish_posts(central.side, 1, body='z' * 5000)
    central.sync()
    edit_post(central.side, 1, body='short now')

    assert central.pcommunicate('--give-up-outbound', '1').returncode == 2  # needs --reason
    result = central.pcommunicate('--give-up-outbound', '1', '2', '--reason', 'too big',
                                  '--by', 'alice')
    assert result.returncode == 1  # 2 is pending, not set aside: not given up
    assert 'gave up on 1 outbound message(s)' in result.stdout
    assert '1 of the ids named are not set-aside outbound messages' in result.stderr
    row = outbound(central.side)[1]
    assert (row['given_up_by'], row['given_up_reason']) == ('alice', 'too big')

    assert counts(central.sync())['pushed'] == 1  # the edit, never the given-up one
    assert [p['body'] for p in facade.side.rows('posts')] == ['short now']
    assert outbound(central.side)[1]['delivered_at'] is None
    status = json.loads(central.sync('--status', '--json'))
    assert status['outbound'] | {'oldest_pending_age_seconds': None} == {
        'pending': 0, 'failed': 0, 'given_up': 1, 'total': 2,
        'oldest_pending_age_seconds': None}
    assert status['outbound_failures'] == []

    # Named, a given-up message is revived (and set aside again here).
    assert '1 outbound message(s)' in central.sync('--retry-outbound', '1')
    assert central.sync().strip().endswith(' set_aside=1')
    assert outbound(central.side)[1]['attempts'] == 2


class RefusingPeer:
    """Takes every push, except a message whose body holds ``poison``
    (HTTP 400: never valid) or ``flaky`` (HTTP 500 while ``broken``)."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.broken = True

    def __call__(self, environ, start_response):
        path, method = environ['PATH_INFO'], environ['REQUEST_METHOD']
        body = read_body(environ)
        headers = [('Content-Type', 'application/json'), ('X-Communicator-Name', 'facade'),
                   ('X-Communicator-Protocol', '1')]
        if path == '/messages.json' and method == 'POST':
            messages = json.loads(body)
            if any('poison' in m['body'] for m in messages):
                start_response('400 Bad Request', headers)
                return [b'{"error": "not a valid post"}']
            if self.broken and any('flaky' in m['body'] for m in messages):
                start_response('500 Internal Server Error', headers)
                return [b'{"error": "oops"}']
            self.received += [m['id'] for m in messages]
            start_response('202 Accepted', headers)
            return [b'{}']
        if path == '/messages.json' and method == 'GET':
            start_response('200 OK', headers)
            return [b'[]']
        start_response('404 Not Found', headers)
        return [b'{}']


def test_a_400_for_one_message_sets_it_aside_a_500_fails_the_run(make_side, make_central):
    peer = RefusingPeer()
    with serve_wsgi(peer) as url:
        central = make_central(make_side('central'), url, **{'communicator.batch_size': 4})
        publish_posts(central.side, 2)
        publish_posts(central.side, 1, body='poison')     # 3
        publish_posts(central.side, 2)
        edit_post(central.side, 3, body='fixed')           # 6: waits behind 3

        result = central.pcommunicate('--push')
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(peer.received) == [1, 2, 4, 5]
        row = outbound(central.side)[3]
        assert row['last_error'].startswith('refused by the peer: ')
        assert 'HTTP 400: {"error": "not a valid post"}' in row['last_error']
        assert outbound(central.side)[6]['delivered_at'] is None

        publish_posts(central.side, 1, body='flaky')        # 7
        result = central.pcommunicate('--push')
        assert result.returncode == 1
        assert 'HTTP 500' in result.stderr
        assert outbound(central.side)[7]['failed_at'] is None  # not set aside
        peer.broken = False
        assert counts(central.sync('--push'))['pushed'] == 1   # retried by the next run
        assert 7 in peer.received and 6 not in peer.received


def test_a_peer_that_refuses_every_push_fails_the_run_and_sets_nothing_aside(
        make_side, make_central):
    """A 400 for an empty push too is the peer's problem, not a message's."""
    def refuse_all(environ, start_response):
        read_body(environ)
        start_response('400 Bad Request', [('Content-Type', 'application/json')])
        return [b'{"error": "X-Communicator-Name is this app\'s own communicator.name"}']

    with serve_wsgi(refuse_all) as url:
        central = make_central(make_side('central'), url)
        publish_posts(central.side, 3)
        result = central.pcommunicate('--push')
    assert result.returncode == 1
    assert 'HTTP 400' in result.stderr
    assert central.side.count('outbound_messages', 'failed_at IS NOT NULL') == 0
