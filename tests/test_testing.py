"""``config.include('pyramid_communicator.testing')`` in a host app's tests.

The host here is a tiny app wired the way the Pyramid cookiecutter
(sqlalchemy backend) wires one: its ``models`` include adds ``pyramid_tm``
and a ``request.dbsession`` from ``get_tm_session``, with the fixture
hooks of the cookiecutter's conftest (``dbengine`` in the settings,
``app.dbsession`` in the environ).
"""
from __future__ import annotations

import json

import pytest
import transaction
import zope.sqlalchemy
from conftest import versioned
from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.response import Response
from sqlalchemy import Integer, String, engine_from_config
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from webtest import TestApp

from pyramid_communicator import get_settings, receives_from
from pyramid_communicator.testing import TEST_SETTINGS, basic_auth


class Base(DeclarativeBase):
    pass


@receives_from('testing_note', autopublish=True)
class Note(Base):
    __tablename__ = 'testing_notes'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str] = mapped_column(String(100))


def get_tm_session(session_factory, transaction_manager, request=None):
    dbsession = session_factory(info={'request': request})
    zope.sqlalchemy.register(dbsession, transaction_manager=transaction_manager)
    return dbsession


def models_includeme(config: Configurator) -> None:
    """The cookiecutter's ``.models`` include, as it generates it."""
    settings = config.get_settings()
    settings['tm.manager_hook'] = 'pyramid_tm.explicit_manager'
    config.include('pyramid_tm')
    dbengine = settings.get('dbengine') or engine_from_config(settings, 'sqlalchemy.')
    session_factory = sessionmaker(bind=dbengine)
    config.registry['dbsession_factory'] = session_factory

    def dbsession(request):
        session = request.environ.get('app.dbsession')
        if session is None:
            session = get_tm_session(session_factory, request.tm, request=request)
        return session

    config.add_request_method(dbsession, reify=True)


def add_note(request):
    note = Note(text=request.json_body['text'])
    request.dbsession.add(note)
    request.dbsession.flush()
    return Response(json={'id': note.id})


def main(global_config, testing_include: bool = False, **settings):
    """The host's ``main``: ``.models``, then the add-on (or, in a test
    that builds the app itself, the testing include instead)."""
    with Configurator(settings=settings) as config:
        config.include(models_includeme)
        config.include('pyramid_communicator.testing' if testing_include
                       else 'pyramid_communicator')
        config.add_route('notes', '/notes')
        config.add_view(add_note, route_name='notes', request_method='POST')
    return config.make_wsgi_app()


@pytest.fixture
def host_db(make_side):
    side = make_side('host')
    Base.metadata.drop_all(side.engine)
    Base.metadata.create_all(side.engine)
    yield side
    Base.metadata.drop_all(side.engine)


def message(remote_id: int, text: str, original_id: int) -> dict:
    return {'id': remote_id, 'body': json.dumps({'testing_note': {'text': text}}),
            'origin': 'peer', 'original_id': original_id}


def test_the_include_makes_a_working_app_from_bare_test_settings(host_db):
    app = main({}, testing_include=True, **{'sqlalchemy.url': host_db.url})
    settings = get_settings(app.registry)
    assert (settings.name, settings.username, settings.password) == (
        TEST_SETTINGS['communicator.name'], TEST_SETTINGS['communicator.username'],
        TEST_SETTINGS['communicator.password'])
    assert settings.base_uri is None  # no peer, and none needed
    test_app = TestApp(app)

    # The host's own view publishes (autopublish) through request.dbsession...
    note_id = test_app.post_json('/notes', {'text': 'hello'}).json['id']
    served = json.loads(test_app.get('/messages.json?from_id=1',
                                     headers=basic_auth(app.registry)).body)
    assert [(m['origin'], m['original_id'], json.loads(m['body'])) for m in served] == [
        ('test', note_id, {'testing_note': {'text': 'hello'}})]
    # ...and what a peer sends is stored and applied.
    response = test_app.post_json('/messages.json',
                                  [versioned(message(1, 'from a peer', 5), 'peer')],
                                  headers={**basic_auth(app.registry),
                                           'X-Communicator-Name': 'peer'})
    assert response.status_int == 202
    assert sorted(row['text'] for row in host_db.rows('testing_notes')) == [
        'from a peer', 'hello']
    # Our routes keep their own credentials.
    assert test_app.get('/messages.json?from_id=1', expect_errors=True).status_int == 401


def test_the_include_keeps_the_settings_the_app_gives(host_db):
    app = main({}, testing_include=True, **{'sqlalchemy.url': host_db.url,
                                            'communicator.name': 'myapp',
                                            'communicator.base_uri': 'http://peer.invalid'})
    settings = get_settings(app.registry)
    assert (settings.name, settings.base_uri) == ('myapp', 'http://peer.invalid')
    assert settings.username == TEST_SETTINGS['communicator.username']


def test_the_include_still_checks_what_it_is_given(host_db):
    with pytest.raises(ConfigurationError, match='communicator.batch_size'):
        main({}, testing_include=True, **{'sqlalchemy.url': host_db.url,
                                          'communicator.batch_size': 'many'})


def test_in_pyramid_includes_of_a_test_ini_beside_the_apps_own_include(host_db):
    """``pyramid.includes = pyramid_communicator.testing`` in testing.ini,
    and the host's ``main`` unchanged."""
    app = main({}, **{'sqlalchemy.url': host_db.url,
                      'pyramid.includes': 'pyramid_communicator.testing'})
    assert get_settings(app.registry).name == TEST_SETTINGS['communicator.name']
    test_app = TestApp(app)
    test_app.post_json('/notes', {'text': 'via testing.ini'})
    assert host_db.count('outbound_messages') == 1
    assert test_app.post_json('/messages.json', [message(1, 'in', 9)],
                              headers=basic_auth(app.registry)).status_int == 202


def test_the_cookiecutter_fixtures_share_a_doomed_transaction(host_db):
    """The cookiecutter's ``testapp`` fixture: one doomed transaction and
    session for the whole test, aborted at the end; our views write
    through that session and nothing stays behind."""
    app = main({}, testing_include=True, **{'sqlalchemy.url': host_db.url,
                                            'dbengine': host_db.engine})
    tm = transaction.TransactionManager(explicit=True)
    tm.begin()
    tm.doom()
    dbsession = get_tm_session(app.registry['dbsession_factory'], tm)
    test_app = TestApp(app, extra_environ={'tm.active': True, 'tm.manager': tm,
                                           'app.dbsession': dbsession})
    test_app.post_json('/notes', {'text': 'rolled back'})
    assert test_app.post_json('/messages.json', [message(1, 'in', 9)],
                              headers=basic_auth(app.registry)).status_int == 202
    assert dbsession.query(Note).count() == 1  # seen inside the test's transaction
    tm.abort()
    assert host_db.count('testing_notes') == 0
    assert host_db.count('outbound_messages') == 0
    assert host_db.count('inbound_messages') == 0
