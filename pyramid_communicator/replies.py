"""Replies from a peer that may be hostile, read within bounds.

The facade lives on the public internet; if it is broken into, it must not
be able to keep ``pcommunicate`` running or make it use unbounded memory.
Two guards, used by :class:`.client.Client` for every request:

- :class:`Deadline`: ``communicator.timeout`` bounds a whole request and
  its reply.  requests' own timeout applies to each read, so a peer that
  sends one byte every few seconds would never trip it.  A watchdog timer
  shuts down the socket in use once the deadline passes, which ends
  whatever read is waiting.  To know that socket, the connections of
  :class:`WatchedAdapter` report themselves to the deadline of the thread
  that uses them.
- :func:`read_body`: the reply's body, decompressed by hand chunk by
  chunk, refused once it passes the cap (a gzip bomb never unpacks).
"""
from __future__ import annotations

import socket
import threading
import zlib
from collections.abc import Iterator
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

#: Bytes read from the socket at a time.
CHUNK = 64 * 1024
#: Content-Encodings a reply may have.
IDENTITY, GZIP = ('', 'identity'), 'gzip'

_current = threading.local()


class ReplyRefused(ValueError):
    """The reply breaks a bound (too large, an unknown encoding, broken
    gzip); the message is one line, without the peer's words."""


class Deadline:
    """``with Deadline(seconds) as deadline:`` every socket this thread's
    requests use inside the block is shut down once ``seconds`` pass;
    ``deadline.expired`` then says so (a cut reply may look complete: a
    body without Content-Length simply ends)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._timer.cancel()
        _current.deadline = None

    def watch(self, sock: socket.socket | None) -> None:
        """A socket this request uses; shut down at once if it is late."""
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if not self.expired:
                return
        _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sockets = list(self._sockets)
        for sock in sockets:
            _shut(sock)


def _shut(sock: socket.socket) -> None:
    """Shut the connection down under whoever is reading it: the blocked
    read returns at once.  The plain socket's method, also for a TLS
    socket, whose own ``shutdown`` would pull its state from under the
    reading thread."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # closed already


def _watch(sock: socket.socket | None) -> None:
    deadline = getattr(_current, 'deadline', None)
    if deadline is not None:
        deadline.watch(sock)


class _Watched:
    """Reports its socket to the current thread's :class:`Deadline`: a new
    one as soon as it is connected (before any TLS handshake), a reused
    one when a request goes out on it."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:
        _watch(getattr(self, 'sock', None))
        super().request(*args, **kwargs)  # type: ignore[misc]


class _WatchedHTTPConnection(_Watched, HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, HTTPSConnection):
    pass


class _WatchedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _WatchedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS = {'http': _WatchedHTTPPool, 'https': _WatchedHTTPSPool}


class WatchedAdapter(HTTPAdapter):
    """requests' adapter, with connections a :class:`Deadline` can cut."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if hasattr(manager, 'pool_classes_by_scheme'):
            manager.pool_classes_by_scheme = _POOLS
        return manager


def read_body(raw: Any, headers: Any, limit: int) -> bytes:
    """The body of a streamed reply (``raw``: urllib3's response), at most
    ``limit`` bytes once decompressed.  Holds no more than that: each chunk
    is inflated as it arrives, with ``max_length``."""
    encoding = (headers.get('Content-Encoding') or '').strip().lower()
    if encoding not in IDENTITY and encoding != GZIP:
        raise ReplyRefused('reply has an unsupported Content-Encoding '
                           '(only identity and gzip are accepted)')
    length = (headers.get('Content-Length') or '').strip()
    if length.isdigit() and int(length) > limit:
        raise ReplyRefused(f'reply over {limit} bytes (Content-Length {int(length)})')
    body = bytearray()
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == GZIP else None
    received = 0
    for chunk in _chunks(raw):
        received += len(chunk)
        if received > limit:  # compressed or not, more than the cap is absurd
            raise ReplyRefused(f'reply over {limit} bytes')
        if inflater is None:
            body += chunk
            continue
        _inflate(inflater, chunk, body, limit)
    if inflater is not None and not inflater.eof:
        raise ReplyRefused('reply is truncated gzip')
    return bytes(body)


def _chunks(raw: Any) -> Iterator[bytes]:
    yield from raw.stream(CHUNK, decode_content=False)


def _inflate(inflater: Any, chunk: bytes, body: bytearray, limit: int) -> None:
    if inflater.eof:
        raise ReplyRefused('reply has data after its gzip stream')
    data = chunk
    while data:
        try:
            out = inflater.decompress(data, limit - len(body) + 1)
        except zlib.error:
            raise ReplyRefused('reply is malformed gzip') from None
        body += out
        if len(body) > limit:
            raise ReplyRefused(f'reply over {limit} bytes once decompressed')
        if not out and inflater.unconsumed_tail == data:
            break  # nothing moves (cannot happen with zlib): no endless loop
        data = inflater.unconsumed_tail
        if inflater.eof and inflater.unused_data:
            raise ReplyRefused('reply has data after its gzip stream')
