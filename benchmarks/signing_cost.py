"""What signing costs a push: ``python benchmarks/signing_cost.py [N]``.

Every record message an app authors is signed as it is written to the
wire (:mod:`pyramid_communicator.signatures`).  This times turning N
outbound rows into the wire body (``outbound_to_wire`` and ``dumps``)
without and with the signing key, for a small and a 4 KiB body, and
prints the ratio, and the bytes a signature adds.  The receiver tries
its own key on every signed message it applies (a message its key signed
is an echo, :func:`pyramid_communicator.echoes.is_echo`): the second
ratio is parsing the body plus that check against parsing alone.  In
memory: no database, no network (both add a fixed cost per message that
makes the ratio smaller in a real run).

Prints ratios from one run (timings on a shared machine are noisy; compare
ratios, not seconds).
"""
from __future__ import annotations

import json
import secrets
import sys
import time
from types import SimpleNamespace

from pyramid_communicator.signatures import verify
from pyramid_communicator.wire import dumps, outbound_to_wire, parse_messages


def _rows(count: int, body_bytes: int) -> list[SimpleNamespace]:
    text = 'x' * body_bytes
    version = json.dumps({'clock': {'': 1764470405123456},
                          'stamps': {'title': [1764470405123456, ''],
                                     'body': [1764470405123456, '']}})
    return [SimpleNamespace(id=i, body=json.dumps({'post': {'title': f't{i}', 'body': text}}),
                            origin=None, original_id=i, refs=None, version=version,
                            format=2, signature=None) for i in range(1, count + 1)]


def _time(rows: list[SimpleNamespace], key: bytes | None) -> tuple[float, int]:
    started = time.perf_counter()
    payload = dumps([outbound_to_wire(row, 'central', key) for row in rows])
    return time.perf_counter() - started, len(payload)


def main(count: int) -> None:
    key = secrets.token_bytes(32)
    for body_bytes in (20, 4096):
        rows = _rows(count, body_bytes)
        _time(rows[:100], key)  # warm up
        plain, plain_size = min(_time(rows, None) for _ in range(3))
        signed, signed_size = min(_time(rows, key) for _ in range(3))
        print(f'{count} messages, {body_bytes}-byte bodies: signed/unsigned time '
              f'{signed / plain:.2f}, bytes {signed_size / plain_size:.3f} '
              f'(+{(signed_size - plain_size) // count} per message)')
        payload = dumps([outbound_to_wire(row, 'central', key) for row in rows])
        parsed = min(_parse(payload, None) for _ in range(3))
        checked = min(_parse(payload, secrets.token_bytes(32)) for _ in range(3))
        print(f'{count} messages, {body_bytes}-byte bodies: received, parse and check '
              f'with our key/parse only {checked / parsed:.2f}')


def _parse(payload: bytes, key: bytes | None) -> float:
    """Parse a pushed body; with ``key``, try it on every message (none
    verifies: the peer signed them, the common case)."""
    started = time.perf_counter()
    messages = parse_messages(payload)
    if key is not None:
        for m in messages:
            verify(key, m.signature, m.origin, m.original_id, m.body, m.version, m.refs)
    return time.perf_counter() - started


if __name__ == '__main__':
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000)
