"""Peers that are not our app, served for real on loopback: the Ruby
gem's server (no ``/status.json``) or a newer version of ours."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
        pass


@contextlib.contextmanager
def serve_wsgi(app: Callable) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1 in a thread; yields its base URL."""
    server: WSGIServer = make_server('127.0.0.1', 0, app, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={'poll_interval': 0.1},
                              daemon=True)
    thread.start()
    try:
        yield f'http://127.0.0.1:{server.server_port}'
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def read_body(environ: dict) -> bytes:
    return environ['wsgi.input'].read(int(environ.get('CONTENT_LENGTH') or 0))
