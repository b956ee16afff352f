"""HTTP client for a peer's ``/messages.json``.

Every failure becomes a :class:`PeerError` whose message is one line that
names the URL and never the credentials.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping, Sequence

import requests
from urllib3.exceptions import HTTPError

from . import wire
from .printable import printable
from .replies import Deadline, ReplyRefused, WatchedAdapter, read_body
from .restores import CHECKPOINT_HEADER
from .settings import CommunicatorSettings, is_valid_name, require_base_uri

log = logging.getLogger(__name__)


class PeerError(Exception):
    """The peer could not be reached or refused the request."""


class AuthenticationRefused(PeerError):
    pass


class BodyTooLarge(PeerError):
    pass


class RequestRefused(PeerError):
    """The peer answered with an HTTP error (not 401/403, 413 or a
    redirect): ``status`` says which, so that a push can tell a request
    the peer will never take (most 4xx) from one worth sending again."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclasses.dataclass
class Reply:
    """A reply read whole, within the bounds."""
    status_code: int
    headers: Mapping[str, str]
    body: bytes


@dataclasses.dataclass
class PullReply:
    messages: list[wire.WireMessage]
    more: bool
    sender: str
    #: The peer tracks deliveries and wants an acknowledgement (our
    #: extension); a gem server does not.
    acknowledges: bool


class Client:
    def __init__(self, settings: CommunicatorSettings,
                 http: requests.Session | None = None) -> None:
        self.base_uri = require_base_uri(settings)
        self.messages_url = self.base_uri + '/messages.json'
        self.delivered_url = self.base_uri + '/messages/delivered.json'
        self.status_url = self.base_uri + '/status.json'
        self.verify_url = self.base_uri + '/verify.json'
        self.name = settings.name
        self.timeout = settings.timeout
        #: The largest reply read, decompressed: a peer must not make us
        #: hold more (our own server's limit is the same setting).
        self.max_reply_bytes = settings.max_body_bytes
        self.http = http or requests.Session()
        adapter = WatchedAdapter()
        self.http.mount('http://', adapter)
        self.http.mount('https://', adapter)
        self.http.auth = (settings.username, settings.password)
        self.verify = settings.verify
        #: Mutual TLS: our certificate, and its key when it is a file apart.
        self.cert: str | tuple[str, str] | None = settings.cert
        if settings.cert and settings.key:
            self.cert = (settings.cert, settings.key)
        self.http.headers.update({wire.NAME_HEADER: settings.name,
                                  'Accept': 'application/json',
                                  'Accept-Encoding': 'gzip'})
        #: Does the peer take gzip bodies?  Learnt from its replies.
        self.peer_gzip = False
        #: Who answered the last push (its ``X-Communicator-Name``; the URL
        #: for a gem, which names itself nowhere), as ``last_push_at``
        #: records it beside ``last_pull_at``'s sender.
        self.push_peer: str | None = None
        #: Bodies of ``/verify.json`` exchanges as they crossed the wire
        #: (compressed where they were), and how many there were.
        self.verify_bytes_sent = 0
        self.verify_bytes_received = 0
        self.verify_requests = 0

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, missing_ok: bool = False,
                 **kwargs) -> Reply:
        """One exchange, bounded: within ``communicator.timeout`` as a
        whole, a body of at most ``communicator.max_body_bytes``, no
        redirect followed (a peer must not send our records elsewhere)."""
        with Deadline(self.timeout) as deadline:
            try:
                reply = self._exchange(method, url, missing_ok, **kwargs)
                if deadline.expired:  # a cut reply can look complete
                    raise self._late(url)
                return reply
            except PeerError:
                if deadline.expired:
                    raise self._late(url) from None
                raise
            except Exception as exc:
                if deadline.expired:  # whatever the cut socket made of it
                    raise self._late(url) from None
                raise self._failure(url, exc) from None

    def _late(self, url: str) -> PeerError:
        return PeerError(f'{url} did not answer within {self.timeout:g} seconds')

    def _failure(self, url: str, exc: Exception) -> PeerError:
        if isinstance(exc, requests.Timeout):
            return self._late(url)
        if isinstance(exc, requests.exceptions.SSLError):
            return PeerError(self._tls_failure(url, exc))
        if isinstance(exc, requests.ConnectionError):
            return PeerError(f'cannot reach {url}: {_reason(exc)}')
        if isinstance(exc, ReplyRefused):
            return PeerError(f'{url} sent a refused reply: {exc}')
        if isinstance(exc, (requests.RequestException, HTTPError, OSError)):
            return PeerError(f'request to {url} failed: {printable(_first_line(exc), 300)}')
        raise exc

    def _exchange(self, method: str, url: str, missing_ok: bool, **kwargs) -> Reply:
        # verify per request: on a session, requests lets REQUESTS_CA_BUNDLE
        # (or CURL_CA_BUNDLE) in the environment override it.
        response = self.http.request(method, url, timeout=self.timeout, verify=self.verify,
                                     cert=self.cert, allow_redirects=False, stream=True,
                                     **kwargs)
        with response:
            status = response.status_code
            if 300 <= status < 400:
                location = printable(response.headers.get('Location', ''), 200)
                raise PeerError(f'{url} answered HTTP {status} redirecting to '
                                f'{location or "(no Location)"}; redirects are not followed')
            if status in (401, 403):
                raise AuthenticationRefused(
                    f'{url} refused the credentials (HTTP {status}); '
                    'check communicator.username and communicator.password')
            if status == 413:
                raise BodyTooLarge(f'{url} refused the request as too large (HTTP 413)')
            if status == 404 and missing_ok:
                return Reply(status, response.headers, b'')
            if not 200 <= status < 300:
                raise RequestRefused(f'{url} answered HTTP {status}' + self._detail(response),
                                     status)
            body = read_body(response.raw, response.headers, self.max_reply_bytes)
            return Reply(status, response.headers, body)

    def _detail(self, response: requests.Response) -> str:
        """The start of an error reply's body, as one safe line."""
        try:
            body = read_body(response.raw, response.headers, _ERROR_BODY_BYTES)
        except ReplyRefused:
            return ''
        detail = printable(_first_line(body[:200].decode('utf-8', 'replace')), 200)
        return f': {detail}' if detail else ''

    def _tls_failure(self, url: str, exc: Exception) -> str:
        """One line for a failed handshake, saying which setting to look at."""
        text = _first_line(exc)
        found = _SSL_REASON.search(text)
        if found is None:
            return f'TLS handshake with {url} failed: {printable(text, 300)}'
        code, reason = found.group(1), found.group(2).strip()
        if code == 'CERTIFICATE_VERIFY_FAILED':
            return (f'TLS verification of {url} failed: {reason} (communicator.verify '
                    'names the CA bundle of a private CA)')
        if code.endswith(_CLIENT_CERT_ALERTS):
            hint = ('the peer refused our client certificate (communicator.cert)'
                    if self.cert else 'the peer requires a client certificate: set '
                    'communicator.cert (and communicator.key)')
            return f'TLS handshake with {url} failed: {reason}; {hint}'
        return f'TLS handshake with {url} failed: {reason}'

    def push(self, payload: bytes) -> None:
        """POST an encoded array of messages; returns once acknowledged.

        Compressed once the peer has said it takes gzip (our server from
        protocol 2 on; the first request of a run goes plain)."""
        response, _ = self._post_json(self.messages_url, payload)
        self.push_peer = self._sender(response)

    def _post_json(self, url: str, payload: bytes) -> tuple[Reply, int]:
        """POST a JSON body, gzipped once the peer takes it; the reply and
        the bytes sent."""
        headers = {'Content-Type': 'application/json'}
        if self.peer_gzip:
            payload = wire.gzip_body(payload)
            headers['Content-Encoding'] = 'gzip'
        response = self._request('POST', url, data=payload, headers=headers)
        self._learn(response)
        return response, len(payload)

    def checkpoint(self, headers: Mapping[str, str]) -> tuple[Mapping[str, str], str] | None:
        """The run's first request: an empty push carrying the checkpoint
        headers (:mod:`.restores`).  The reply's headers and the peer's
        name, or None when the peer keeps no checkpoints (a gem, an older
        version: they take the empty push and answer without them, or
        have no such route)."""
        response = self._request('POST', self.messages_url, missing_ok=True, data=b'[]',
                                 headers={'Content-Type': 'application/json', **headers})
        if response.status_code == 404:
            return None
        self._learn(response)
        if CHECKPOINT_HEADER not in response.headers:
            return None
        return response.headers, self._sender(response)

    def _learn(self, response: Reply) -> None:
        protocol = response.headers.get(wire.PROTOCOL_HEADER, '')
        self.peer_gzip = protocol.isdigit() and int(protocol) >= 2

    def pull(self, from_id: int) -> PullReply:
        response = self._request('GET', self.messages_url,
                                 params={'from_id': from_id, 'pending': '1'})
        self._learn(response)
        try:
            messages = wire.parse_messages(response.body)
        except wire.WireError as exc:
            raise PeerError(f'{self.messages_url} sent an invalid reply: '
                            f'{printable(str(exc), 300)}') from None
        return PullReply(
            messages=messages,
            more=response.headers.get(wire.MORE_HEADER) == '1',
            sender=self._sender(response),
            acknowledges=wire.PROTOCOL_HEADER in response.headers,
        )

    def _sender(self, response: Reply) -> str:
        """Who the messages are from, as they will be stored: the name the
        peer gives, which must be a possible name and not ours (a peer
        posing as this app would address our records as their origin); the
        gem gives none, and its URL stands for it."""
        name = response.headers.get(wire.NAME_HEADER)
        if name is None:
            return self.base_uri
        if not is_valid_name(name):
            raise PeerError(f'{self.messages_url} sent an invalid {wire.NAME_HEADER} '
                            f'header ({printable(name, 80)}): a name is 1-64 letters, '
                            'digits, "_", "." or "-"')
        if name == self.name:
            raise PeerError(f'{self.messages_url} claims to be {name}, which is this '
                            "app's own communicator.name")
        return name

    def status(self) -> dict | None:
        """The peer's ``GET /status.json`` (our extension), or None when it
        has no such route (the gem: 404)."""
        response = self._request('GET', self.status_url, missing_ok=True)
        if response.status_code == 404:
            return None
        try:
            status = wire.parse_json(response.body)
        except wire.WireError:
            status = None
        if not isinstance(status, dict) or not isinstance(status.get('outbound'), dict):
            raise PeerError(f'{self.status_url} sent an invalid reply (not a status)')
        return status

    def verify_request(self, request: dict) -> tuple[dict, str]:
        """POST one ``/verify.json`` request (see :mod:`.verify`); the
        peer's reply, a JSON object, and the peer's name.  The bodies'
        sizes on the wire are counted (``verify_bytes_*``)."""
        payload = json.dumps(request, separators=(',', ':')).encode('utf-8')
        response, sent = self._post_json(self.verify_url, payload)
        self.verify_requests += 1
        self.verify_bytes_sent += sent
        length = response.headers.get('Content-Length', '')
        self.verify_bytes_received += int(length) if length.isdigit() else len(response.body)
        try:
            reply = wire.parse_json(response.body)
        except wire.WireError as exc:
            raise PeerError(f'{self.verify_url} sent an invalid reply: '
                            f'{printable(str(exc), 300)}') from None
        if not isinstance(reply, dict):
            raise PeerError(f'{self.verify_url} sent an invalid reply (not an object)')
        return reply, self._sender(response)

    def acknowledge(self, ids: Sequence[int]) -> None:
        self._request('POST', self.delivered_url, json={'ids': list(ids)})


#: Of an error reply, the bytes read for its first line.
_ERROR_BODY_BYTES = 64 * 1024
#: OpenSSL's words inside requests' message: "[SSL: CODE] reason (_ssl.c:123)".
_SSL_REASON = re.compile(r'\[SSL: ([A-Z0-9_]+)\] ([^(]+)')
#: Alerts a server sends about the client's certificate, or its absence.
_CLIENT_CERT_ALERTS = ('CERTIFICATE_REQUIRED', 'HANDSHAKE_FAILURE', 'BAD_CERTIFICATE',
                       'UNKNOWN_CA', 'CERTIFICATE_UNKNOWN', 'ACCESS_DENIED')


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else ''


def _reason(exc: Exception) -> str:
    """The innermost cause of a connection error ("Connection refused")."""
    cause: BaseException | None = exc
    while cause is not None and (cause.__cause__ or cause.__context__):
        cause = cause.__cause__ or cause.__context__
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
    text = _first_line(exc)
    if 'Connection refused' in text:
        return 'Connection refused'
    return printable(text, 200)
