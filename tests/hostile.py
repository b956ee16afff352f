"""A hostile facade: a raw-socket HTTP server on loopback that answers the
way a broken-into facade could (drips, bombs, huge bodies, redirects,
junk), for ``test_hostile_client.py`` and ``benchmarks/hostile_replies.py``.

A handler gets the request and returns what to send: bytes to write, or a
number of seconds to pause.  Every connection is closed after one reply.
Sending stops as soon as the client has gone, so a reply of a gibibyte
costs only what the client reads of it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import socket
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator

CHUNK = 64 * 1024
Item = bytes | float


@dataclasses.dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


Handler = Callable[[Request], Iterable[Item]]


class HostileServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[Request] = []
        self.listener = socket.create_server(('127.0.0.1', 0))
        self.url = f'http://127.0.0.1:{self.listener.getsockname()[1]}'
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                request = _read_request(conn)
                if request is None:
                    return
                self.requests.append(request)
                for item in self.handler(request):
                    if self.stopping.is_set():
                        return
                    if isinstance(item, bytes):
                        conn.sendall(item)
                    else:
                        self.stopping.wait(item)
            except OSError:
                return  # the client hung up: it stopped reading

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == 'POST']


def _read_request(conn: socket.socket) -> Request | None:
    conn.settimeout(30)
    data = b''
    while b'\r\n\r\n' not in data:
        chunk = conn.recv(CHUNK)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b'\r\n\r\n')
    first, *lines = head.decode('latin-1').split('\r\n')
    method, path, _ = first.split(' ', 2)
    headers = {}
    for line in lines:
        key, _, value = line.partition(':')
        headers[key.strip().lower()] = value.strip()
    length = int(headers.get('content-length', 0))
    while len(body) < length:
        chunk = conn.recv(CHUNK)
        if not chunk:
            break
        body += chunk
    return Request(method, path, headers, body)


@contextlib.contextmanager
def hostile_server(handler: Handler) -> Iterator[HostileServer]:
    server = HostileServer(handler)
    server.thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        try:
            server.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept
        except OSError:
            pass
        server.listener.close()
        server.thread.join(timeout=10)


# -- replies ------------------------------------------------------------------

def head(status: str = '200 OK', **headers: str | int) -> bytes:
    lines = [f'HTTP/1.1 {status}', 'Connection: close',
             *(f'{key.replace("_", "-")}: {value}' for key, value in headers.items())]
    return ('\r\n'.join(lines) + '\r\n\r\n').encode('latin-1')


def json_reply(value: object, **headers: str | int) -> list[Item]:
    body = json.dumps(value).encode()
    return [head(Content_Type='application/json', Content_Length=len(body), **headers), body]


def huge(size: int, content_length: bool = False) -> Iterator[Item]:
    """``size`` bytes of a JSON-looking array, streamed."""
    extra = {'Content_Length': size} if content_length else {}
    yield head(Content_Type='application/json', **extra)
    yield b'['
    sent = 1
    block = b' ' * CHUNK
    while sent < size:
        part = block[:size - sent]
        yield part
        sent += len(part)


def gzip_bomb(inflated: int) -> Iterator[Item]:
    """A gzip body of ``inflated`` zero bytes, compressed as it is sent:
    about a thousandth of that goes on the wire, and neither side ever
    holds more than a chunk."""
    yield head(Content_Type='application/json', Content_Encoding='gzip')
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    for _ in range(inflated // len(zeros)):
        out = compressor.compress(zeros)
        if out:
            yield out
    yield compressor.flush()


def drip(every: float, in_headers: bool = False, seconds: float = 600) -> Iterator[Item]:
    """One byte every ``every`` seconds, in the headers or in the body,
    for up to ``seconds``."""
    if in_headers:
        yield b'HTTP/1.1 200 OK\r\nX-Slow: '
    else:
        yield head(Content_Type='application/json', Content_Length=10 ** 6)
        yield b'['
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        yield every
        yield b'a' if in_headers else b' '


def redirect(location: str, status: str = '307 Temporary Redirect') -> list[Item]:
    return [head(status, Location=location, Content_Length=0)]


def plain_push(request: Request) -> list[Item] | None:
    """Take a push (an empty one) as a facade of protocol 2 would."""
    if request.method == 'POST':
        return json_reply([], X_Communicator_Protocol=2, X_Communicator_Name='facade')
    return None
