"""The wire between two apps of ours: gzip bodies both ways, the body
limit on the decompressed size, and batches bounded by bytes."""
from __future__ import annotations

import gzip
import json

import pytest
from pyramid.request import Request
from test_end_to_end import central_post, summary
from test_views import (
    MESSAGES,
    assert_nothing_stored,
    assert_one_line_error,
    basic,
    message,
    publish_posts,
)

from pyramid_communicator.wire import NAME_HEADER


@pytest.fixture
def facade(make_side):
    return make_side('facade')


@pytest.fixture
def app(webapp, facade):
    return webapp(facade)


def post_gzip(app, payload: bytes, encoding: str = 'gzip'):
    return app.post(MESSAGES, payload, content_type='application/json', expect_errors=True,
                    headers={**basic(), 'Content-Encoding': encoding, NAME_HEADER: 'central'})


def test_a_gzip_body_is_stored_like_a_plain_one(app, facade):
    raw = json.dumps([message(1), message(2)]).encode()
    response = post_gzip(app, gzip.compress(raw))
    assert response.status_int == 202
    assert facade.count('inbound_messages') == 2


def test_the_body_limit_applies_to_the_decompressed_size(webapp, make_side):
    facade = make_side('facade')
    app = webapp(facade, **{'communicator.max_body_bytes': '10000'})
    bomb = gzip.compress(b'[' + b' ' * 5_000_000 + b']')
    assert len(bomb) < 10000
    reason = assert_one_line_error(post_gzip(app, bomb), 413)
    assert 'decompressed' in reason
    assert_nothing_stored(facade)


def test_broken_or_unknown_encodings_are_refused(app, facade):
    raw = json.dumps([message(1)]).encode()
    assert_one_line_error(post_gzip(app, gzip.compress(raw)[:-8]), 400)
    assert_one_line_error(post_gzip(app, b'not gzip at all'), 400)
    assert_one_line_error(post_gzip(app, raw, encoding='br'), 415)
    assert_nothing_stored(facade)


def test_get_is_compressed_for_our_client_only(app, facade):
    publish_posts(facade, 3)

    def get(query: str, **headers: str):
        # WebOb directly: WebTest would decompress before we could look.
        request = Request.blank(f'{MESSAGES}?{query}', headers={**basic(), **headers})
        return request.get_response(app.app)

    ours = get('from_id=0&pending=1', Accept='application/json',
               **{'Accept-Encoding': 'gzip', NAME_HEADER: 'central'})
    assert ours.headers['Content-Encoding'] == 'gzip'
    assert len(json.loads(gzip.decompress(ours.body))) == 3
    gem = get('from_id=0', **{'Accept-Encoding': 'gzip'})
    assert 'Content-Encoding' not in gem.headers
    assert len(json.loads(gem.body)) == 3


def test_batches_are_bounded_by_bytes(webapp, make_side):
    facade = make_side('facade')
    app = webapp(facade, **{'communicator.batch_bytes': '150'})
    publish_posts(facade, 5)
    reply = app.get(f'{MESSAGES}?from_id=0&pending=1',
                    headers={**basic(), 'Accept': 'application/json'})
    served = reply.json
    assert 1 <= len(served) < 5 and reply.headers['X-Communicator-More'] == '1'


def test_a_run_between_our_apps_compresses_after_the_first_request(
        make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.batch_size': '5'})
    central = make_central(make_side('central'), facade.url,
                           **{'communicator.batch_size': '5',
                              'communicator.batch_bytes': '200'})
    for number in range(12):
        central_post(central, title=f'post {number}', body='x' * 40)
    assert summary(central.sync())['pushed'] == 12
    assert facade.side.count('posts') == 12
    log = facade.log.read_text() if facade.log.exists() else ''
    assert 'Traceback' not in log
