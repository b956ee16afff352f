"""HTTP client for a peer's ``/messages.json``.

Every failure becomes a :class:`PeerError` whose message is one line that
names the URL and never the credentials.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence

import requests

from . import wire
from .settings import CommunicatorSettings, require_base_uri

log = logging.getLogger(__name__)


class PeerError(Exception):
    """The peer could not be reached or refused the request."""


class AuthenticationRefused(PeerError):
    pass


class BodyTooLarge(PeerError):
    pass


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
        self.timeout = settings.timeout
        self.http = http or requests.Session()
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

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, missing_ok: bool = False,
                 **kwargs) -> requests.Response:
        try:
            # verify per request: on a session, requests lets REQUESTS_CA_BUNDLE
            # (or CURL_CA_BUNDLE) in the environment override it.
            response = self.http.request(method, url, timeout=self.timeout,
                                         verify=self.verify, cert=self.cert, **kwargs)
        except requests.Timeout:
            raise PeerError(f'{url} did not answer within {self.timeout:g} seconds') from None
        except requests.exceptions.SSLError as exc:
            raise PeerError(self._tls_failure(url, exc)) from None
        except requests.ConnectionError as exc:
            raise PeerError(f'cannot reach {url}: {_reason(exc)}') from None
        except requests.RequestException as exc:
            raise PeerError(f'request to {url} failed: {_first_line(exc)}') from None
        if response.status_code in (401, 403):
            raise AuthenticationRefused(
                f'{url} refused the credentials (HTTP {response.status_code}); '
                'check communicator.username and communicator.password')
        if response.status_code == 413:
            raise BodyTooLarge(f'{url} refused the request as too large (HTTP 413)')
        if response.status_code == 404 and missing_ok:
            return response
        if not 200 <= response.status_code < 300:
            detail = _first_line(response.text[:200]) if response.text else ''
            raise PeerError(f'{url} answered HTTP {response.status_code}'
                            + (f': {detail}' if detail else ''))
        return response

    def _tls_failure(self, url: str, exc: Exception) -> str:
        """One line for a failed handshake, saying which setting to look at."""
        text = _first_line(exc)
        found = _SSL_REASON.search(text)
        if found is None:
            return f'TLS handshake with {url} failed: {text[:300]}'
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
        headers = {'Content-Type': 'application/json'}
        if self.peer_gzip:
            payload = wire.gzip_body(payload)
            headers['Content-Encoding'] = 'gzip'
        response = self._request('POST', self.messages_url, data=payload, headers=headers)
        self._learn(response)

    def _learn(self, response: requests.Response) -> None:
        protocol = response.headers.get(wire.PROTOCOL_HEADER, '')
        self.peer_gzip = protocol.isdigit() and int(protocol) >= 2

    def pull(self, from_id: int) -> PullReply:
        response = self._request('GET', self.messages_url,
                                 params={'from_id': from_id, 'pending': '1'})
        self._learn(response)
        try:
            messages = wire.parse_messages(response.content)
        except wire.WireError as exc:
            raise PeerError(f'{self.messages_url} sent an invalid reply: {exc}') from None
        return PullReply(
            messages=messages,
            more=response.headers.get(wire.MORE_HEADER) == '1',
            sender=response.headers.get(wire.NAME_HEADER) or self.base_uri,
            acknowledges=wire.PROTOCOL_HEADER in response.headers,
        )

    def status(self) -> dict | None:
        """The peer's ``GET /status.json`` (our extension), or None when it
        has no such route (the gem: 404)."""
        response = self._request('GET', self.status_url, missing_ok=True)
        if response.status_code == 404:
            return None
        try:
            status = response.json()
        except ValueError:
            status = None
        if not isinstance(status, dict) or not isinstance(status.get('outbound'), dict):
            raise PeerError(f'{self.status_url} sent an invalid reply (not a status)')
        return status

    def acknowledge(self, ids: Sequence[int]) -> None:
        self._request('POST', self.delivered_url, json={'ids': list(ids)})


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
    return text[:200]
