"""Plain messages: commands and events across the firewall, handled
exactly once.

``send(request, kind, payload, key=None)`` writes a message to the
outbound queue in the request's transaction, as ``publish`` writes a
record: if the transaction aborts, the message is gone with it.  The peer
stores it once and hands it to the handler registered for its kind
(``@message_handler`` or ``config.add_message_handler``), in the
transaction that marks it applied: what the handler writes commits with
that mark, so a message's effects happen once, whatever is killed or
lost on the way.

A handler that raises fails its message: kept with the error and
retried with the records' back-off.  A kind without a handler here, or
from a sender its handler does not accept, is refused: kept, never run.

Bodies and their checks are in :mod:`.message_bodies`; the inbox
(:mod:`.inbox`) calls :func:`dispatch` in the order messages were sent.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Iterable
from typing import Any

import venusian
from pyramid.config import Configurator
from pyramid.threadlocal import get_current_registry
from sqlalchemy.orm import Session
from zope.sqlalchemy import mark_changed

from . import wire
from .message_bodies import MAX_DEPTH, PLAIN, check_key, check_kind, depth
from .models import outbound_messages, utcnow
from .records import APPLYING
from .settings import REGISTRY_KEY, CommunicatorSettings, get_settings, is_valid_name
from .trust import Refused

__all__ = ['send', 'message_handler', 'add_message_handler', 'Message', 'Handler',
           'MAX_PAYLOAD_BYTES', 'GemPeer']

#: Registry key of ``{kind: Handler}``.
HANDLERS_KEY = 'pyramid_communicator.message_handlers'
#: ``session.info`` key holding the app's :class:`.CommunicatorSettings`:
#: set on the sessions that apply messages, so that a handler can
#: ``send(message.session, ...)``; a host may set it on its own sessions.
SETTINGS_INFO = 'pyramid_communicator.settings'
#: The largest body a message may have, whatever ``max_body_bytes`` says:
#: a message is a command or an event, not a file transfer.
MAX_PAYLOAD_BYTES = 1024 * 1024
#: Room left in a push for the message's envelope (id, format, quoting).
_ENVELOPE = 1024

_compact = json.JSONEncoder(separators=(',', ':'), ensure_ascii=False,
                            allow_nan=False).encode


class GemPeer(RuntimeError):
    """The peer runs the Ruby gem, which knows records only."""


# -- sending ------------------------------------------------------------------

def payload_limit(settings: CommunicatorSettings) -> int:
    """The largest body ``send`` accepts: half of ``max_body_bytes`` (on
    the wire, JSON quoting of the body can double it) and at most
    :data:`MAX_PAYLOAD_BYTES`."""
    return min(MAX_PAYLOAD_BYTES, settings.max_body_bytes // 2 - _ENVELOPE)


def _sender(target: Any) -> tuple[Session, CommunicatorSettings]:
    """The session and settings of ``send``'s first argument: a request
    (anything with a ``registry``: its ``communicator.dbsession``), or a
    session that carries the settings in ``info`` (a handler's)."""
    registry = getattr(target, 'registry', None)
    if registry is not None:
        settings = get_settings(registry)
        return getattr(target, settings.dbsession), settings
    if isinstance(target, Session):
        settings = target.info.get(SETTINGS_INFO)
        if settings is None:
            # The host's request.dbsession, in a request or a script that
            # bootstrapped the app: the registry Pyramid made current.
            settings = get_current_registry().get(REGISTRY_KEY)
        if settings is not None:
            return target, settings
        raise TypeError('send() needs the request (send(request, ...)), or a session '
                        'in a request or a bootstrapped script of an app that includes '
                        "pyramid_communicator (or a handler's message.session)")
    raise TypeError(f'send() needs a request or a session, not {type(target).__name__}')


def encode(kind: str, payload: Any, key: str | None, limit: int,
           sent_at: datetime.datetime | None = None) -> str:
    """The body of a message, checked as the receiver will check it:
    TypeError for a payload JSON cannot hold, ValueError for a bad kind
    or key, a payload nested too deeply, or a body over ``limit`` bytes."""
    check_kind(kind)
    check_key(key)
    if depth(payload) > MAX_DEPTH:
        raise ValueError(f'the payload of a {kind!r} message nests more than {MAX_DEPTH} '
                         'levels deep')
    stamp = (sent_at or utcnow()).isoformat() + 'Z'
    try:
        body = _compact({PLAIN: {'kind': kind, 'payload': payload, 'key': key,
                                 'sent_at': stamp}})
    except (TypeError, ValueError) as exc:  # ValueError: NaN, a circular reference
        raise TypeError(f'the payload of a {kind!r} message is not JSON: {exc}') from None
    size = len(body.encode('utf-8', 'surrogatepass'))
    if size > limit:
        raise ValueError(f'the {kind!r} message is {size} bytes as JSON, more than the '
                         f'{limit} a message may have (half of communicator.max_body_bytes, '
                         f'at most {MAX_PAYLOAD_BYTES}); send a reference to the data instead')
    if not wire.storable(body):
        raise ValueError(f'the payload of a {kind!r} message holds text that is not '
                         'UTF-8 (a lone surrogate)')
    return body


def send(target: Any, kind: str, payload: Any, key: str | None = None) -> int:
    """Send the peer a message of ``kind`` with ``payload`` (anything JSON
    holds), in ``target``'s current transaction; returns its outbound id.

    ``target`` is the request (its ``communicator.dbsession`` is used), or
    in a handler ``message.session``.  The message goes if and when that
    transaction commits.  Messages are handled in the order sent; one that
    fails is set aside and the others go on, except those of the same kind
    and ``key``, which wait behind it.

    Raises at once, in the sender's request: TypeError for a payload JSON
    cannot hold, ValueError for a bad kind or key or a payload that is too
    big or deep, :class:`GemPeer` when the peer runs the Ruby gem
    (``communicator.gem_peer``), which cannot receive messages.
    """
    session, settings = _sender(target)
    if settings.gem_peer:
        raise GemPeer(f'cannot send a {kind!r} message: the peer runs the Ruby gem '
                      '(communicator.gem_peer = true), which receives records only')
    body = encode(kind, payload, key, payload_limit(settings))
    row = {'body': body, 'origin': None, 'original_id': None, 'refs': None,
           'version': None, 'format': wire.MESSAGE_FORMAT, 'created_at': utcnow()}
    result = session.connection().execute(outbound_messages.insert().values(row))
    mark_changed(session)
    return result.inserted_primary_key[0]


# -- handlers -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Handler:
    kind: str
    callable: Callable[[Message], Any]
    #: The peers it takes messages from (None: any peer).
    accept_from: frozenset[str] | None = None


@dataclasses.dataclass(frozen=True)
class Message:
    """What a handler gets."""
    kind: str
    payload: Any
    #: The peer that sent it (its ``communicator.name``).
    origin: str
    #: The sender's id of the message: (origin, id) names it for good.
    id: int
    #: When the sender sent it, by its clock (naive UTC), if it said.
    sent_at: datetime.datetime | None
    #: The ordering key it was sent with.
    key: str | None
    #: The session of the transaction applying it: write through it, and
    #: what you write commits with the message's applied mark.
    session: Session
    registry: Any
    #: The ``transaction.TransactionManager`` of that transaction: ours,
    #: neither ``request.tm`` nor the thread-local ``transaction.manager``.
    #: Bind what joins transactions to it (pyramid_mailer:
    #: ``get_mailer(registry).bind(transaction_manager=...)``).
    transaction_manager: Any = None


def _accept_from(value: str | Iterable[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    names = frozenset([value] if isinstance(value, str) else value)
    bad = sorted(name for name in names if not is_valid_name(name))
    if bad or not names:
        raise ValueError(f'accept_from names apps (communicator.name): {bad or "none given"}')
    return names


def handlers(registry: Any) -> dict[str, Handler]:
    return registry.setdefault(HANDLERS_KEY, {})


def add_message_handler(config: Configurator, kind: str,
                        handler: Callable[[Message], Any] | str,
                        accept_from: str | Iterable[str] | None = None) -> None:
    """Config directive: ``handler(message)`` handles messages of ``kind``
    (from the peers named in ``accept_from``, None: any).  One handler
    per kind: a second one is a configuration conflict."""
    check_kind(kind)
    handler = config.maybe_dotted(handler)
    if not callable(handler):
        raise ValueError(f'the handler of {kind!r} is not callable: {handler!r}')
    entry = Handler(kind, handler, _accept_from(accept_from))

    def register() -> None:
        handlers(config.registry)[kind] = entry

    intr = config.introspectable('communicator message handlers', kind,
                                 f'message handler {kind!r}', 'communicator message handler')
    intr['handler'] = handler
    intr['accept_from'] = entry.accept_from
    config.action(('pyramid_communicator.message_handler', kind), register,
                  introspectables=(intr,))


class message_handler:  # noqa: N801 - a decorator, named as view_config
    """Decorator: the function handles messages of ``kind``, registered
    when ``config.scan()`` finds it (as ``@view_config``)::

        @message_handler('contact.submitted', accept_from='facade')
        def contact_submitted(message):
            message.session.add(ContactRequest(**message.payload))
    """
    venusian = venusian

    def __init__(self, kind: str, accept_from: str | Iterable[str] | None = None) -> None:
        self.kind = check_kind(kind)
        self.accept_from = _accept_from(accept_from)

    def __call__(self, wrapped: Callable[[Message], Any]) -> Callable[[Message], Any]:
        kind, accept_from = self.kind, self.accept_from

        def callback(context: Any, name: str, ob: Any) -> None:
            config = context.config.with_package(info.module)
            config.add_message_handler(kind, ob, accept_from=accept_from)

        info = self.venusian.attach(wrapped, callback, category='pyramid')
        return wrapped


# -- dispatch -------------------------------------------------------------------

class NoHandlers(LookupError):
    """Applied by code that did not pass the app's registry: the message
    fails (retried later) rather than being refused for want of a handler."""


def _sent_at(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.removesuffix('Z'))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(datetime.UTC).replace(tzinfo=None)
    return parsed


def handler_for(registry: Any, sender: str, fields: dict[str, Any]) -> Handler:
    """The handler of a received message, or why there is none: refused
    (kept, never run) for a kind without a handler here or a sender the
    handler does not accept; :class:`NoHandlers` (a failure, retried)
    without the registry."""
    kind = fields['kind']
    if registry is None:
        raise NoHandlers(f'a {kind!r} message was applied without the app\'s registry, '
                         'so no handler could be found; retried by the app')
    handler = handlers(registry).get(kind)
    if handler is None:
        raise Refused(f'{sender} sent a message of kind {kind!r}, which no handler here '
                      'takes (config.add_message_handler)')
    if handler.accept_from is not None and sender not in handler.accept_from:
        raise Refused(f'{sender} sent a message of kind {kind!r}, which is taken from '
                      f'{", ".join(sorted(handler.accept_from))} only')
    return handler


def dispatch(session: Session, registry: Any, handler: Handler, sender: str,
             remote_id: int, fields: dict[str, Any], tm: Any = None) -> None:
    """Hand one received message to its handler, in the caller's
    transaction (which marks it applied).

    What the handler raises fails the message (``trust.Refused`` refuses
    it).  What the handler changes is this app's own change, so
    autopublished models publish it, as in a request; the records applied
    from messages stay unpublished (no echo).
    """
    kind = handler.kind
    session.info.setdefault(SETTINGS_INFO, get_settings(registry))
    message = Message(kind, fields['payload'], sender, remote_id,
                      _sent_at(fields.get('sent_at')), fields.get('key'), session, registry,
                      tm)
    session.flush()  # the records applied before it, unpublished
    applying = session.info.pop(APPLYING, None)
    try:
        try:
            handler.callable(message)
            session.flush()  # while its changes are the app's own
        except Exception as exc:
            exc.add_note(f'in the handler of {kind!r} messages')
            raise
    finally:
        if applying is not None:
            session.info[APPLYING] = applying
