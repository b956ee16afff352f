"""A peer's reply with a malformed message in it: central stores and
applies the others, keeps the bad one refused (``--status`` shows it),
and acknowledges it with them so that the peer moves on; an item without
a usable id is neither stored nor acknowledged."""
from __future__ import annotations

import json

from conftest import versioned
from fakes import read_body, serve_wsgi
from test_end_to_end import summary


def good(number: int) -> dict:
    return versioned({'id': number, 'body': json.dumps({'post': {'title': f'Post {number}'}}),
                      'origin': 'facade', 'original_id': number, 'format': 2}, 'facade')


class MalformedPeer:
    """Serves one reply, in our protocol (it wants acknowledgements), with
    a malformed ``version`` at id 2 and an item without an id; then none."""

    def __init__(self) -> None:
        self.acknowledged: list[int] = []
        self.reply = [good(1), {**good(2), 'version': {'clock': 5}}, good(3),
                      {'id': 'four', 'body': '{}'}]

    def __call__(self, environ, start_response):
        path, method = environ['PATH_INFO'], environ['REQUEST_METHOD']
        body = read_body(environ)
        headers = [('Content-Type', 'application/json'), ('X-Communicator-Name', 'facade'),
                   ('X-Communicator-Protocol', '2')]
        if path == '/messages.json' and method == 'GET':
            served, self.reply = self.reply, []
            start_response('200 OK', headers)
            return [json.dumps(served).encode()]
        if path == '/messages/delivered.json' and method == 'POST':
            self.acknowledged += json.loads(body)['ids']
            start_response('200 OK', headers)
            return [b'{"acknowledged": 0}']
        start_response('404 Not Found', [('Content-Type', 'text/plain')])
        return [b'not found']


def test_a_pulled_reply_with_a_malformed_message_applies_the_others(make_side, make_central):
    peer = MalformedPeer()
    with serve_wsgi(peer) as url:
        central = make_central(make_side('central'), url)
        result = central.pcommunicate('--pull')
        assert result.returncode == 0, result.stdout + result.stderr
        counts = summary(result.stdout)
        status = central.pcommunicate('--status', '--json')
    assert (counts['pulled'], counts['applied'], counts['failed']) == (3, 2, 0)
    assert 'refused 1 malformed messages from facade and skipped 1' in result.stderr
    assert sorted(p['title'] for p in central.side.rows('posts')) == ['Post 1', 'Post 3']
    rows = {r['remote_id']: r for r in central.side.rows('inbound_messages')}
    assert sorted(rows) == [1, 2, 3]
    assert rows[2]['refused_at'] is not None and rows[2]['processed_at'] is None
    assert rows[2]['last_error'].startswith('refused: "version" must be')
    assert sorted(peer.acknowledged) == [1, 2, 3]
    shown = json.loads(status.stdout)
    assert shown['inbound']['refused'] == 1 and shown['inbound']['pending'] == 0
