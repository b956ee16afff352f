"""For a host app's tests: ``config.include('pyramid_communicator.testing')``
instead of ``config.include('pyramid_communicator')``.

Like ``pyramid_mailer.testing``, it makes the add-on work in tests without
what production needs: it fills in the ``communicator.*`` settings a test
ini lacks (a name and credentials; never a peer, so nothing tries to
reach one), then includes the add-on as usual, routes and all.  Settings
the app does give are kept.  It can also go in a test ini as
``pyramid.includes = pyramid_communicator.testing``: the app's own
``config.include('pyramid_communicator')`` then finds the settings filled.
"""
from __future__ import annotations

import base64

from pyramid.config import Configurator

from .settings import PREFIX, get_settings

#: What a test app gets unless its settings say otherwise.
TEST_SETTINGS = {
    PREFIX + 'name': 'test',
    PREFIX + 'username': 'communicator-test',
    PREFIX + 'password': 'communicator-test',
}


def includeme(config: Configurator) -> None:
    """Fill in the missing test settings, then include the add-on."""
    settings = config.get_settings()
    config.add_settings({key: value for key, value in TEST_SETTINGS.items()
                         if not str(settings.get(key) or '').strip()})
    config.include('pyramid_communicator')


def basic_auth(registry) -> dict[str, str]:
    """The ``Authorization`` header a peer of this app would send, for
    WebTest requests to ``/messages.json``."""
    settings = get_settings(registry)
    token = base64.b64encode(f'{settings.username}:{settings.password}'.encode()).decode()
    return {'Authorization': f'Basic {token}'}
