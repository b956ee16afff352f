"""The server side: ``/messages.json``, its acknowledgement route and
``/status.json``.

The views answer with a response object instead of raising, so that the
host's exception views (HTML error pages, say) never see our errors.
They read and write through the host's request session, inside the
request's transaction; applying what arrived happens after that
transaction commits, with a session and transaction manager of our own.
"""
from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

from pyramid.authentication import extract_http_basic_credentials
from pyramid.request import Request
from pyramid.response import Response

from . import echoes, queues, restores, throttle, wire
from .retries import Backoff
from .settings import CommunicatorSettings, get_settings, is_valid_name
from .status import queue_status
from .sync import apply_inbound

log = logging.getLogger(__name__)
T = TypeVar('T')


def _json(status: int, data: object, **headers: str) -> Response:
    response = Response(status=status, content_type='application/json', charset='utf-8')
    response.body = json.dumps(data, separators=(',', ':')).encode('utf-8')
    response.headers.update(headers)
    return response


def _error(status: int, reason: str, **headers: str) -> Response:
    return _json(status, {'error': reason}, **headers)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode('utf-8'), expected.encode('utf-8'))


def _authenticate(request: Request, settings: CommunicatorSettings) -> Response | None:
    """None when the request carries our credentials, else the 401 (or,
    for an address with too many failed logins, the 429) to send."""
    guard: throttle.LoginThrottle | None = request.registry.get(throttle.REGISTRY_KEY)
    address = request.client_addr
    if guard is not None:
        wait = guard.retry_after(address)
        if wait is not None:  # the credentials are not even looked at
            return _error(429, f'too many failed logins; retry in {wait} seconds',
                          **{'Retry-After': str(wait)})
    credentials = extract_http_basic_credentials(request)
    if credentials is not None:
        # Both comparisons always run: the time taken tells nothing.
        user_ok = _same(credentials.username, settings.username)
        password_ok = _same(credentials.password, settings.password)
        if user_ok and password_ok:
            return None
    if guard is not None:
        guard.failed(address)  # logs once per address and window
    else:
        log.warning('refused unauthenticated request from %s', address)
    return _error(401, 'authentication required',
                  **{'WWW-Authenticate': 'Basic realm="communicator"'})


def _admit(request: Request, settings: CommunicatorSettings) -> str | Response:
    """Authenticate, then name the peer: the name to store it under, or
    the error response to send."""
    refused = _authenticate(request, settings)
    if refused is not None:
        return refused
    return _peer(request, settings)


def _read_body(request: Request, limit: int) -> bytes | Response:
    """The request body, decompressed; ``limit`` applies to both the bytes
    received and the bytes they decompress to."""
    length = request.content_length
    if length is not None and length > limit:
        return _error(413, f'request body over {limit} bytes')
    body = request.body_file.read(limit + 1) if length is None else request.body
    if len(body) > limit:
        return _error(413, f'request body over {limit} bytes')
    encoding = (request.headers.get('Content-Encoding') or 'identity').strip().lower()
    if encoding == 'gzip':
        try:
            return wire.gunzip_body(body, limit)
        except wire.TooLarge as exc:
            return _error(413, str(exc))
        except wire.WireError as exc:
            return _error(400, str(exc))
    if encoding != 'identity':
        return _error(415, f'Content-Encoding {encoding} is not supported (gzip is)')
    return body


def _dbsession(request: Request, settings: CommunicatorSettings):
    return getattr(request, settings.dbsession)


def _apply_after_commit(request: Request, settings: CommunicatorSettings, started: float,
                        known: dict[tuple[str, int], wire.WireMessage] | None = None) -> None:
    """Apply pending inbound messages once this request has committed:
    new arrivals (``known``: those this request stored, parsed already),
    and failures of earlier runs retried whenever the client talks to us.

    The hook runs inside the request, before the reply goes out (the
    transaction commits when the view returns, and WSGI servers send
    nothing until the app returns), so the client waits for it.  It works
    for ``communicator.apply_seconds`` from ``started`` (when the request
    came) at most, oldest messages first and a page at least, then the
    hourly purge gets what is left of that (a page at least); whatever
    remains waits for the next request, which the client sends anyway.
    Unbounded, a backlog made every reply take as long as applying all of
    it, the client gave up after ``communicator.timeout`` and sent again."""
    if not settings.apply_on_receive:
        return
    bind = _dbsession(request, settings).get_bind()
    registry = request.registry  # where plain messages find their handlers
    deadline = started + settings.apply_seconds if settings.apply_seconds else None

    def out_of_time() -> bool:
        return deadline is not None and time.monotonic() >= deadline

    def hook(committed: bool) -> None:
        if not committed:
            return
        try:
            result = apply_inbound(bind, settings, known=known, stop=out_of_time,
                                   registry=registry)
        except Exception as exc:  # the reply is sent anyway; retried next time
            log.error('applying inbound messages failed: %s', type(exc).__name__)
            log.debug('applying inbound messages failed', exc_info=True)
            return
        if result.applied or result.failed:
            log.info('applied %d inbound messages, %d failed, %d waiting',
                     result.applied, result.failed, result.waiting)

    request.tm.get().addAfterCommitHook(hook)


def _peer(request: Request, settings: CommunicatorSettings) -> str | Response:
    """Who is asking, as stored (inbound ``sender``, the ``last_*_at``
    state rows): the name our client sends, else (the gem's client) the
    Basic user name made a valid name.  A name that is not one, or that is
    this app's own (two apps configured with one name would mix up whose
    records are whose), is refused."""
    name = request.headers.get(wire.NAME_HEADER)
    if name is not None:
        if not is_valid_name(name):
            return _error(400, f'{wire.NAME_HEADER} must be 1-64 letters, digits, '
                          '"_", "." or "-"')
        if name == settings.name:
            return _error(400, f'{wire.NAME_HEADER} is this app\'s own communicator.name; '
                          'the two apps need names of their own')
        return name
    return basic_user_name(settings.username)


def basic_user_name(username: str) -> str:
    """The name a client without ``X-Communicator-Name`` (the gem's) is
    stored under: its Basic user name (which matched ours), with anything
    a name may not hold replaced by ``_`` and cut to 64 characters."""
    if is_valid_name(username):
        return username
    return re.sub(r'[^A-Za-z0-9_.-]', '_', username)[:64] or 'client'


def _headers(settings: CommunicatorSettings, more: bool = False) -> dict[str, str]:
    headers = {wire.NAME_HEADER: settings.name,
               wire.PROTOCOL_HEADER: wire.PROTOCOL_VERSION}
    if more:
        headers[wire.MORE_HEADER] = '1'
    return headers


def get_messages(request: Request) -> Response:
    """``GET /messages.json?from_id=N``: messages for the client to store.

    With ``pending=1`` (our client) it serves the messages not yet
    acknowledged, whatever ``from_id`` says, because ids may commit out of
    order and a cursor would skip the late ones.  Without it (the Ruby
    gem's client) it serves ``id >= from_id`` and counts them delivered.
    """
    started = time.monotonic()
    settings = get_settings(request.registry)
    peer = _admit(request, settings)
    if isinstance(peer, Response):
        return peer
    try:
        query = request.GET
    except UnicodeDecodeError:  # WebOb decodes the query string on first use
        return _error(400, 'the query string is not valid UTF-8')
    raw = query.get('from_id', '')
    try:
        from_id = int(raw)
    except ValueError:
        from_id = -1
    if from_id < 0 or from_id >= 2 ** 63:
        return _error(400, 'from_id must be a non-negative integer')
    session = _dbsession(request, settings)
    limit = settings.batch_size
    if query.get('pending') == '1':
        rows = queues.pending_outbound(session, limit + 1)
    else:
        rows = queues.outbound_from(session, from_id, limit + 1)
    more = len(rows) > limit
    fetched = rows[:limit]
    rows = queues.within_bytes(fetched, settings.batch_bytes)
    more = more or len(rows) < len(fetched)
    key = None if settings.gem_peer else echoes.signing_key(session)
    messages = [wire.outbound_to_wire(row, settings.name, key) for row in rows]
    if query.get('pending') != '1':
        queues.mark_delivered(session, [m.id for m in messages])
    # When the peer last pulled from us (to within seconds: a big pull
    # writes it once, not on every GET).
    queues.touch_state(session, 'last_served_at', peer)
    _apply_after_commit(request, settings, started)
    body = wire.dumps(messages)
    compress = (request.headers.get(wire.NAME_HEADER)
                and 'gzip' in (request.headers.get('Accept-Encoding') or ''))
    response = Response(status=200, content_type=_reply_type(request), charset='utf-8',
                        body=wire.gzip_body(body) if compress else body)
    if compress:  # our client; the gem's gets the plain JSON it always did
        response.content_encoding = 'gzip'
        response.vary = ('Accept-Encoding',)
    # Not Response(headers=...): that replaces Content-Type and Content-Length.
    response.headers.update(_headers(settings, more))
    return response


def _reply_type(request: Request) -> str:
    """The gem's HTTParty client parses an ``application/json`` reply and
    then parses the result again, which fails; the gem's own server said
    ``text/html``.  Clients that ask for JSON (ours does) get JSON."""
    if 'application/json' in (request.headers.get('Accept') or ''):
        return 'application/json'
    return 'text/plain'


def _parsed_post(request: Request, settings: CommunicatorSettings,
                 parse: Callable[[bytes], T]) -> tuple[str, T] | Response:
    """Authenticate, read and parse a POST: the peer's name and the parsed
    body, or the error response to send."""
    peer = _admit(request, settings)
    if isinstance(peer, Response):
        return peer
    body = _read_body(request, settings.max_body_bytes)
    if isinstance(body, Response):
        return body
    try:
        return peer, parse(body)
    except wire.WireError as exc:
        return _error(400, str(exc))


def post_messages(request: Request) -> Response:
    """``POST /messages.json``: store the array, then apply it after commit.

    A malformed message is refused alone: stored refused (``--status``
    shows it), acknowledged with the rest by the 202, never applied; the
    valid ones beside it are applied.  Items without a usable id are
    skipped and counted in the reply."""
    started = time.monotonic()
    settings = get_settings(request.registry)
    parsed = _parsed_post(request, settings, wire.parse_messages)
    if isinstance(parsed, Response):
        return parsed
    sender, messages = parsed
    session = _dbsession(request, settings)
    checkpoint: dict[str, str] = {}
    if restores.CHECKPOINT_HEADER in request.headers:
        # Before anything is stored: a restore heals first (:mod:`.restores`).
        try:
            checkpoint = restores.serve(session, settings.name, sender, request.headers)
        except wire.WireError as exc:
            return _error(400, str(exc))
    stored: list[wire.WireMessage] = []
    if messages:
        # The state row first: its lock queues concurrent POSTs (racing
        # re-sends of one batch), so that each sees what the one before
        # stored instead of inserting the same rows at the same moment,
        # which InnoDB can answer with a deadlock.
        queues.set_state(session, 'last_received_at', sender)
        stored = queues.store_inbound(session, sender, messages)
    # Only what is to be applied: store_inbound leaves refused ones out.  A
    # checkpoint alone applies nothing: the run's push does, as before.
    if messages or not checkpoint:
        _apply_after_commit(request, settings, started,
                            {(sender, m.id): m for m in stored if m.error is None})
    # The sender's name only when it gave one: never the Basic user name.
    named = sender if request.headers.get(wire.NAME_HEADER) else 'a client without a name'
    log.info('received %d messages from %s', len(messages), named)
    if messages.refused or messages.skipped:
        log.warning('refused %d malformed messages from %s and skipped %d without a '
                    'usable id', messages.refused, named, messages.skipped)
    reply = {'received': len(messages)}
    if messages.refused:
        reply['refused'] = messages.refused
    if messages.skipped:
        reply['skipped'] = messages.skipped
    return _json(202, reply, **_headers(settings), **checkpoint)


#: Ids one acknowledgement may name, per message of a batch: a client
#: acknowledges one reply (at most ``batch_size`` messages) at a time.
ACK_IDS_PER_BATCH = 2
#: ... and at least this many, whatever the batch size.
ACK_IDS_MIN = 1000


def post_delivered(request: Request) -> Response:
    """``POST /messages/delivered.json`` ``{"ids": [...]}``: the client
    stored these messages; they will not be served again."""
    started = time.monotonic()
    settings = get_settings(request.registry)
    limit = max(ACK_IDS_MIN, ACK_IDS_PER_BATCH * settings.batch_size)
    parsed = _parsed_post(request, settings, lambda raw: wire.parse_ids(raw, limit))
    if isinstance(parsed, Response):
        return parsed
    peer, ids = parsed
    session = _dbsession(request, settings)
    acknowledged = queues.mark_delivered(session, ids)
    queues.set_state(session, 'last_acknowledged_at', peer)
    _apply_after_commit(request, settings, started)
    return _json(200, {'acknowledged': acknowledged}, **_headers(settings))


def get_status(request: Request) -> Response:
    """``GET /status.json`` (ours; the gem never asks): this side's queues,
    failures, conflicts and last exchanges, as ``pcommunicate --status
    --json`` shows them, so that central can show both sides and drain
    them.  It only reads."""
    settings = get_settings(request.registry)
    peer = _admit(request, settings)
    if isinstance(peer, Response):
        return peer
    status = queue_status(_dbsession(request, settings), settings.name,
                          backoff=Backoff.of(settings))
    return _json(200, status, **_headers(settings))


def post_verify(request: Request) -> Response:
    """``POST /verify.json`` (ours): summaries or records of identity
    ranges for central's ``pcommunicate --verify``, or (ops ``republish``,
    ``relink``) records and links to send again for ``--repair`` (see
    :mod:`.verify`).  The
    request is checked whole and bounded before anything is read."""
    from .verify import answer, parse_request
    settings = get_settings(request.registry)
    parsed = _parsed_post(request, settings, parse_request)
    if isinstance(parsed, Response):
        return parsed
    peer, verify_request = parsed
    try:
        reply = answer(_dbsession(request, settings), settings.name, verify_request)
    except wire.WireError as exc:
        return _error(400, str(exc))
    if verify_request.op == 'republish':
        log.info('republished %d %s record(s) for %s to repair drift',
                 reply['republished'], verify_request.name, peer)
        queues.set_state(_dbsession(request, settings), 'last_repair',
                         f'republished {reply["republished"]} {verify_request.name} '
                         f'for {peer}'[:255])
    if verify_request.op == 'relink':
        log.info('sent %d %s link state(s) again for %s to repair drift',
                 reply['relinked'], verify_request.name, peer)
    body = json.dumps(reply, separators=(',', ':')).encode('utf-8')
    compress = 'gzip' in (request.headers.get('Accept-Encoding') or '')
    response = Response(status=200, content_type='application/json', charset='utf-8',
                        body=wire.gzip_body(body) if compress else body)
    if compress:
        response.content_encoding = 'gzip'
        response.vary = ('Accept-Encoding',)
    response.headers.update(_headers(settings))
    return response


#: Methods each route answers; others get a 405.
ALLOWED = {'communicator.messages': 'GET, POST', 'communicator.delivered': 'POST',
           'communicator.status': 'GET', 'communicator.verify': 'POST'}


def method_not_allowed(request: Request) -> Response:
    allowed = ALLOWED[request.matched_route.name]
    return _error(405, f'{request.method} is not allowed here', Allow=allowed)
