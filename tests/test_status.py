"""Both sides' status: ``GET /status.json`` as a peer sees it (WebTest), and
``pcommunicate --status`` on central showing central and the facade over
real HTTP, against our facade, a gem-like peer without the route, and a
peer that is not there."""
from __future__ import annotations

import json
import re

import pytest
from conftest import PASSWORD, USERNAME, Central, Server, free_port
from fakes import read_body, serve_wsgi
from test_pcommunicate import error_line, run
from test_views import basic, message, post_messages, publish_posts, record

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Post

STATUS = '/status.json'


@pytest.fixture
def facade(make_side):
    return make_side('facade')


@pytest.fixture
def app(webapp, facade):
    return webapp(facade)


# -- GET /status.json ---------------------------------------------------------------

@pytest.mark.parametrize('headers', [{}, basic(password='wrong'), basic(username='other')],
                         ids=['none', 'wrong password', 'wrong user'])
def test_status_needs_our_credentials(app, facade, headers) -> None:
    publish_posts(facade, 1)
    response = app.get(STATUS, headers=headers, expect_errors=True)
    assert response.status_int == 401
    assert response.headers['WWW-Authenticate'].startswith('Basic')
    assert response.json == {'error': 'authentication required'}


def test_status_answers_only_get(app) -> None:
    response = app.post(STATUS, b'{}', headers=basic(), expect_errors=True)
    assert response.status_int == 405
    assert response.headers['Allow'] == 'GET'


def test_status_shows_the_facades_queues_failures_and_exchanges(app, facade) -> None:
    publish_posts(facade, 3)
    # What central does: pull (naming itself), acknowledge one, push two
    # messages of which one cannot be applied and one is refused.
    named = {**basic(), 'X-Communicator-Name': 'central', 'Accept': 'application/json'}
    served = app.get('/messages.json?from_id=0&pending=1', headers=named).json
    app.post_json('/messages/delivered.json', {'ids': [served[0]['id']]}, headers=named)
    bad = message(1, json.dumps({'no_such_model': {'x': 1}}))
    foreign = message(2, record('Not yours'), origin='facade', original_id=999)
    assert post_messages(app, [bad, foreign],
                         headers={**basic(), 'X-Communicator-Name': 'central'}
                         ).status_int == 202

    response = app.get(STATUS, headers=basic())

    assert response.status_int == 200
    assert response.content_type == 'application/json'
    assert response.headers['X-Communicator-Name'] == 'facade'
    status = response.json
    assert status['name'] == 'facade'
    assert (status['outbound']['pending'], status['outbound']['total']) == (2, 3)
    assert status['outbound']['oldest_pending_age_seconds'] >= 0
    inbound = status['inbound']
    assert (inbound['pending'], inbound['failed'], inbound['refused'], inbound['total']) == (
        1, 1, 1, 2)
    failed, refused = status['failures']
    assert (failed['sender'], failed['remote_id'], failed['refused']) == ('central', 1, False)
    assert 'no_such_model' in failed['error']
    assert (refused['remote_id'], refused['refused']) == (2, True)
    assert refused['error'].startswith('refused')
    assert status['conflicts']['recent'] == 0 and status['conflicts']['recent_hours'] == 24
    exchanges = status['last_exchanges']
    for key in ('last_served_at', 'last_acknowledged_at', 'last_received_at'):
        assert exchanges[key]['peer'] == 'central', key
        assert exchanges[key]['at'].endswith('Z')
    # Looking changes nothing.
    assert facade.count('outbound_messages', 'delivered_at IS NULL') == 2
    again = app.get(STATUS, headers=basic()).json
    assert (again['inbound']['pending'], again['inbound']['failed']) == (1, 1)
    assert facade.rows('inbound_messages')[0]['attempts'] == 1


def test_gems_client_is_known_by_its_user_name(app, facade) -> None:
    publish_posts(facade, 1)
    app.get('/messages.json?from_id=0', headers=basic())  # no name header: the gem
    exchanges = app.get(STATUS, headers=basic()).json['last_exchanges']
    assert exchanges['last_served_at']['peer'] == USERNAME


# -- pcommunicate --status on central -------------------------------------------------

def failure_at_the_facade(central: Central, facade: Server) -> None:
    """A central post whose slug a post of the facade's own already has."""
    with facade.side.session() as session:
        session.add(Post(title='Facade own', slug='dup'))
    with central.side.session() as session:
        post = Post(title='Central', slug='dup')
        session.add(post)
        session.flush()
        publish(session, post)
    assert run(central).returncode == 0


def test_central_status_shows_both_sides(pair) -> None:
    central, facade = pair
    failure_at_the_facade(central, facade)
    facade.create_post(title='waiting at the facade')

    result = run(central, '--status')

    assert result.returncode == 0, result.stderr
    assert result.stderr == ''
    local, peer = result.stdout.split('\n\n')
    local_lines, peer_lines = local.splitlines(), peer.splitlines()
    assert local_lines[0] == 'communicator central'
    assert local_lines[1] == 'outbound: 0 pending (oldest -), 1 in all'
    assert any(re.fullmatch(r'last run: \S+Z ok: pushed=1 pulled=0 applied=0 failed=0 '
                            r'waiting=0 seconds=\S+', line) for line in local_lines), local
    assert peer_lines[0] == f'communicator facade (peer, {facade.url})'
    assert re.fullmatch(r'outbound: 1 pending \(oldest \d+s\), 1 in all', peer_lines[1])
    assert peer_lines[2].startswith('inbound:  1 pending (oldest ')
    assert ', 1 failed, 0 refused, 0 given up, 1 in all' in peer_lines[2]
    assert any(re.fullmatch(r'last_received_at: \S+Z \(central\)', line)
               for line in peer_lines), peer
    assert any(re.fullmatch(r'failed #1 \(from central #1, \d+ attempts, next attempt '
                            r'(in \d+s|due now)\): IntegrityError.*', line)
               for line in peer_lines), peer


def test_central_status_json_has_the_peer(pair) -> None:
    central, facade = pair
    failure_at_the_facade(central, facade)

    result = run(central, '--status', '--json')

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report['name'] == 'central'
    assert report['last_run']['result'].startswith('ok: pushed=1 ')
    assert report['last_exchanges']['last_pull_at']['peer'] == 'facade'
    assert report['last_exchanges']['last_push_at']['peer'] == 'facade'
    peer = report['peer']
    assert (peer['url'], peer['state'], peer['error']) == (facade.url, 'ok', None)
    assert peer['status']['name'] == 'facade'
    assert peer['status']['inbound']['failed'] == 1
    [failure] = peer['status']['failures']
    assert failure['error'].startswith('IntegrityError')
    assert peer['status']['last_exchanges']['last_served_at']['peer'] == 'central'


@pytest.mark.slow
def test_facade_status_shows_only_itself(pair, make_central) -> None:
    central, facade = pair
    failure_at_the_facade(central, facade)
    itself = make_central(facade.side, None)  # the facade's ini: no base_uri

    text = run(itself, '--status')
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0] == 'communicator facade'
    assert 'peer' not in text.stdout and '\n\n' not in text.stdout
    assert 'failed #1 (from central #1' in text.stdout

    report = json.loads(run(itself, '--status', '--json').stdout)
    assert report['name'] == 'facade' and 'peer' not in report
    assert report['inbound']['failed'] == 1


@pytest.mark.slow
def test_peer_without_the_route_is_status_not_available(make_side, make_central) -> None:
    """The gem serves no /status.json: its 404 is no error."""
    with serve_wsgi(gem_like_peer) as url:
        central = make_central(make_side('central'), url)
        assert run(central).returncode == 0  # it syncs with it all right

        result = run(central, '--status')
        assert result.returncode == 0, result.stderr
        assert result.stderr == ''
        assert result.stdout.splitlines()[0] == 'communicator central'
        assert result.stdout.splitlines()[-1].startswith(
            f'peer {url}: status not available')

        report = json.loads(run(central, '--status', '--json').stdout)
        assert report['peer']['state'] == 'not available'
        assert report['peer']['status'] is None
        assert report['outbound']['pending'] == 0


def test_unreachable_peer_still_shows_the_local_side_and_exits_1(make_side, make_central):
    url = f'http://127.0.0.1:{free_port()}'  # nothing listens there
    central = make_central(make_side('central'), url)
    with central.side.session() as session:
        post = Post(title='waiting')
        session.add(post)
        session.flush()
        publish(session, post)

    result = run(central, '--status')

    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines[:2] == ['communicator central', lines[1]]
    assert lines[1].startswith('outbound: 1 pending')
    assert lines[-1].startswith(f'peer {url}: status unreachable: cannot reach {url}/status.json')
    assert error_line(result).startswith(f'pcommunicate: peer status: cannot reach {url}')

    result = run(central, '--status', '--json')
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report['outbound']['pending'] == 1
    assert report['peer']['state'] == 'unreachable'
    assert report['peer']['error'].startswith(f'cannot reach {url}')


def test_status_route_credentials_refused_is_unreachable_too(make_side, serve, make_central):
    facade = serve(make_side('facade'), **{'communicator.password': 'n0t-the-same-pass'})
    central = make_central(make_side('central'), facade.url)
    result = run(central, '--status')
    assert result.returncode == 1
    assert 'refused the credentials' in error_line(result)
    assert PASSWORD not in result.stdout


def gem_like_peer(environ, start_response):
    """What the Ruby gem's server answers: its two message routes, 404
    for anything else (no /status.json, no acknowledgement route)."""
    path, method = environ['PATH_INFO'], environ['REQUEST_METHOD']
    read_body(environ)
    if path == '/messages.json' and method in ('GET', 'POST'):
        start_response('200 OK', [('Content-Type', 'text/html')])
        return [b'[]']
    start_response('404 Not Found', [('Content-Type', 'text/html')])
    return [b'<h1>Not Found</h1>']
