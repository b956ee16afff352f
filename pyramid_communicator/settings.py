"""The ``communicator.*`` settings, read once and checked in one place.

Every knob the add-on has is a row of :data:`SETTINGS`; the README's
settings table is written from the same rows.  A wrong or missing value is
reported as a :class:`pyramid.exceptions.ConfigurationError` naming the key,
at ``config.include`` time or when ``pcommunicate`` starts, never deep inside
a request.
"""
from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from collections.abc import Mapping as MappingType
from typing import Any

from pyramid.exceptions import ConfigurationError
from pyramid.settings import asbool

PREFIX = 'communicator.'
REGISTRY_KEY = 'pyramid_communicator.settings'

_NAME_RE = re.compile(r'^[A-Za-z0-9_.-]{1,64}$')


def is_valid_name(value: str) -> bool:
    """Is this a possible ``communicator.name`` (of ours or a peer's)?"""
    return _NAME_RE.fullmatch(value) is not None


def _name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError('must be 1-64 letters, digits, "_", "." or "-"')
    return value


def _identifier(value: str) -> str:
    if not value.isidentifier():
        raise ValueError('must be a Python identifier (a request attribute name)')
    return value


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError('must be a whole number of at least 1')
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError('must be a whole number of at least 0')
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError('must be a number greater than 0')
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float('inf'):
        raise ValueError('must be a number of at least 0')
    return number


def _uri(value: str) -> str:
    if not re.match(r'^https?://[^/]+', value):
        raise ValueError('must be an http:// or https:// URL')
    return value.rstrip('/')


def _text(value: str) -> str:
    return value


_BOOLEANS = ('true', 'false', 'yes', 'no', 'on', 'off', '1', '0')


def _bool(value: str) -> bool:
    """Like ``asbool``, but a typo is an error rather than False."""
    if value.lower() not in _BOOLEANS:
        raise ValueError('must be true or false')
    return asbool(value)


def _verify(value: str) -> bool | str:
    """``true``/``false`` or the path of a CA bundle, as requests' ``verify``."""
    if value.lower() in _BOOLEANS:
        return asbool(value)
    return value


def _file(value: str) -> str:
    """A path that must name a readable file now, not at the first run."""
    if not os.path.isfile(value):
        raise ValueError('no such file')
    if not os.access(value, os.R_OK):
        raise ValueError('file is not readable')
    return value


@dataclasses.dataclass(frozen=True)
class Setting:
    key: str
    convert: Callable[[str], Any]
    default: Any
    required: bool
    doc: str


REQUIRED = object()

#: One row per setting: (key without prefix, converter, default, doc).
#: A default of ``REQUIRED`` makes the key mandatory.
SETTINGS: tuple[Setting, ...] = tuple(
    Setting(key, convert, None if default is REQUIRED else default,
            default is REQUIRED, doc)
    for key, convert, default, doc in (
        ('name', _name, REQUIRED,
         "this app's origin name on the wire, e.g. central or facade"),
        ('username', _text, REQUIRED,
         'HTTP Basic user name; the server checks it, the client sends it'),
        ('password', _text, REQUIRED,
         'HTTP Basic password; the server checks it, the client sends it'),
        ('base_uri', _uri, None,
         "the peer's URL (plus any route prefix); required to run pcommunicate"),
        ('batch_size', _positive_int, 200,
         'messages per HTTP request and per database read, both directions'),
        ('batch_bytes', _positive_int, 1024 * 1024,
         'a batch also ends once its message bodies reach this many bytes '
         '(at least one message goes)'),
        ('timeout', _positive_float, 10.0,
         'seconds a whole request of the client may take: connecting, sending '
         'and the complete reply; past it the run fails'),
        ('max_body_bytes', _positive_int, 10 * 1024 * 1024,
         'largest request body the server accepts (413 past it; the client '
         'splits pushes to stay under it), and the largest reply the client '
         'reads (decompressed)'),
        ('verify', _verify, True,
         'TLS verification: true, false, or the path of a CA bundle file'),
        ('cert', _file, None,
         'client certificate (PEM file) that pcommunicate presents to a peer '
         'requiring mutual TLS; may hold the key too'),
        ('key', _file, None,
         'private key (PEM file, unencrypted) of communicator.cert, when not in that file'),
        ('dbsession', _identifier, 'dbsession',
         "name of the request attribute holding the host's SQLAlchemy session"),
        ('apply_on_receive', _bool, True,
         'the server applies received messages right after storing them'),
        ('apply_seconds', _non_negative_float, 3.0,
         'seconds the server spends, after storing a request, applying pending inbound '
         'messages (oldest first, a page of communicator.batch_size at least) and '
         'purging old history before it answers; the rest waits for later requests. '
         "Keep it well below the client's communicator.timeout; 0 means no limit"),
        ('retry_delay', _non_negative_int, 30,
         'seconds before a failed inbound message is tried again (pcommunicate '
         '--retry does not wait)'),
        ('retry_max_delay', _non_negative_int, 3600,
         'a failed inbound message waits communicator.retry_delay seconds, doubled '
         'after each further failure, but never more than this many seconds'),
        ('retry_limit', _positive_int, 50,
         'failed inbound messages tried again per apply at most (a pcommunicate run, '
         'or a request the server answers), the longest overdue first; the rest '
         'wait for later ones (pcommunicate --retry tries all)'),
        ('lock_wait', _non_negative_int, 0,
         'seconds pcommunicate waits for a concurrent run to finish; 0 means '
         'exit at once (status 0) when another run holds the lock'),
        ('gem_peer', _bool, False,
         'the peer is a Rails app running the Ruby gem: its messages, which carry '
         'no versions, are applied as the gem did (they overwrite); otherwise such a '
         'message is refused, since our apps always send versions'),
        ('run_seconds', _non_negative_int, 300,
         'once a pcommunicate run has taken this long, it pushes, pulls and '
         'applies no further batch (each does one at least; exit status 0) and '
         'the next run goes on; 0 means no limit'),
        ('retention_days', _non_negative_int, 7,
         'delivered outbound messages, applied, refused, given-up and '
         'waiting-for-an-upgrade inbound messages, conflict records and tombstones of '
         'deletes the peer has, older than this, are deleted, hourly during normal runs '
         'and in slices by the server; 0 keeps them'),
        ('login_attempts', _non_negative_int, 10,
         'failed logins from one client address within communicator.login_window '
         'after which the server answers it 429 without checking credentials; 0 never'),
        ('login_window', _positive_int, 60,
         'seconds over which failed logins are counted per client address'),
    )
)


@dataclasses.dataclass(frozen=True)
class CommunicatorSettings:
    name: str
    username: str
    password: str
    base_uri: str | None = None
    batch_size: int = 200
    batch_bytes: int = 1024 * 1024
    timeout: float = 10.0
    max_body_bytes: int = 10 * 1024 * 1024
    verify: bool | str = True
    cert: str | None = None
    key: str | None = None
    dbsession: str = 'dbsession'
    apply_on_receive: bool = True
    apply_seconds: float = 3.0
    retry_delay: int = 30
    retry_max_delay: int = 3600
    retry_limit: int = 50
    lock_wait: int = 0
    gem_peer: bool = False
    run_seconds: int = 300
    retention_days: int = 7
    login_attempts: int = 10
    login_window: int = 60

    def __repr__(self) -> str:  # never show the password in logs/tracebacks
        return f'<CommunicatorSettings name={self.name!r} base_uri={self.base_uri!r}>'


def parse_settings(settings: MappingType[str, Any]) -> CommunicatorSettings:
    """Convert the ``communicator.*`` keys of an app's settings.

    Raises :class:`ConfigurationError` with the full key in its message.
    """
    values = {}
    for row in SETTINGS:
        key = PREFIX + row.key
        raw = settings.get(key)
        if isinstance(raw, str):
            raw = raw.strip()
        if raw is None or raw == '':
            if row.required:
                raise ConfigurationError(f'{key} is required but not set')
            values[row.key] = row.default
            continue
        try:
            # Apps configured from Python pass ints or bools: check them too.
            values[row.key] = row.convert(raw if isinstance(raw, str) else str(raw))
        except ValueError as exc:
            raise ConfigurationError(f'{key} = {raw!r} is invalid: {exc}') from None
    if values['key'] and not values['cert']:
        raise ConfigurationError(f'{PREFIX}key is set but {PREFIX}cert is not: the key '
                                 'belongs to a client certificate')
    return CommunicatorSettings(**values)


def require_base_uri(settings: CommunicatorSettings) -> str:
    if not settings.base_uri:
        raise ConfigurationError(
            f'{PREFIX}base_uri is required to run pcommunicate but not set')
    return settings.base_uri


def get_settings(registry: Any) -> CommunicatorSettings:
    """The settings ``includeme`` parsed for this app."""
    try:
        return registry[REGISTRY_KEY]
    except KeyError:
        raise ConfigurationError(
            "pyramid_communicator is not configured: call "
            "config.include('pyramid_communicator')") from None
