"""Keep database records of two Pyramid apps in sync through local
inbound/outbound queues (a Python re-creation of the Ruby gem
``communicator``).

Wire it into an app that already has ``pyramid_tm`` and a
``request.dbsession`` joined to ``request.tm``, as the Pyramid
cookiecutter's ``.models`` include sets up::

    config.include('.models')
    config.include('pyramid_communicator')
"""
from __future__ import annotations

from pyramid.config import Configurator
from pyramid.exceptions import ConfigurationError
from pyramid.interfaces import IRequestExtensions, IRequestFactory
from pyramid.request import Request
from pyramid.security import NO_PERMISSION_REQUIRED

from .conflicts import Conflict, Edit, authority
from .messages import message_handler, send
from .publishing import publish, publish_delete, receives_from
from .settings import REGISTRY_KEY, get_settings, parse_settings

__all__ = ['includeme', 'publish', 'publish_delete', 'receives_from', 'authority',
           'Conflict', 'Edit', 'get_settings', 'send', 'message_handler']


def includeme(config: Configurator) -> None:
    """Read ``communicator.*`` settings and add the message and status routes.

    Use ``config.include('pyramid_communicator', route_prefix='/sync')`` to
    mount the routes under a prefix.  Nothing of the host's security,
    CSRF, root or session setup is touched: our views check their own
    Basic credentials and need no permission.
    """
    from . import messages, throttle, views

    settings = parse_settings(config.get_settings())
    config.registry[REGISTRY_KEY] = settings
    # Per process: each server process counts failed logins on its own.
    config.registry[throttle.REGISTRY_KEY] = throttle.LoginThrottle(
        settings.login_attempts, settings.login_window)
    # Plain messages: config.add_message_handler, and @message_handler
    # found by config.scan() (see .messages).
    messages.handlers(config.registry)
    config.add_directive('add_message_handler', messages.add_message_handler)
    config.add_route('communicator.messages', '/messages.json')
    config.add_route('communicator.delivered', '/messages/delivered.json')
    config.add_route('communicator.status', '/status.json')
    config.add_route('communicator.verify', '/verify.json')
    common = dict(permission=NO_PERMISSION_REQUIRED, require_csrf=False)
    config.add_view(views.get_messages, route_name='communicator.messages',
                    request_method='GET', **common)
    config.add_view(views.post_messages, route_name='communicator.messages',
                    request_method='POST', **common)
    config.add_view(views.post_delivered, route_name='communicator.delivered',
                    request_method='POST', **common)
    config.add_view(views.get_status, route_name='communicator.status',
                    request_method='GET', **common)
    config.add_view(views.post_verify, route_name='communicator.verify',
                    request_method='POST', **common)
    for route_name in views.ALLOWED:
        config.add_view(views.method_not_allowed, route_name=route_name, **common)
    # Once the host's own includes have run: is the session attribute there?
    config.action(None, _check_dbsession, args=(config, settings.dbsession), order=1)


def _check_dbsession(config: Configurator, name: str) -> None:
    extensions = config.registry.queryUtility(IRequestExtensions)
    factory = config.registry.queryUtility(IRequestFactory, default=Request)
    known = set()
    if extensions is not None:
        known.update(extensions.methods, extensions.descriptors)
    if name not in known and not hasattr(factory, name):
        raise ConfigurationError(
            f'communicator.dbsession = {name!r}: requests have no such attribute; '
            "add it with config.add_request_method, as the Pyramid cookiecutter's "
            'models package does')
