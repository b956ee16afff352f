"""What the body of a plain message holds, and the checks both ends make
of it.

A plain message (:mod:`.messages`) travels in the outbound and inbound
queues like a record, so that it gets the queues' guarantees (the
transactional outbox, storing once, ordered applying, failures kept and
retried) without a schema change.  Its body names the reserved record
name :data:`PLAIN`, which no model may take (``receives_from`` refuses
names starting with ``@``)::

    {"@message": {"kind": "contact.submitted", "payload": {...},
                  "key": "order-42" or null, "sent_at": "2024-...Z"}}

It is written in :data:`.wire.MESSAGE_FORMAT`, newer than any record: an
older version of this add-on keeps it pending, "waiting for an upgrade",
instead of failing it, and the Ruby gem is never sent one (``send``
refuses when ``communicator.gem_peer`` is set).

This module imports nothing of the add-on, so that :mod:`.wire` (which
checks arrivals) and :mod:`.messages` (which sends and dispatches) can
both use it.
"""
from __future__ import annotations

import re
from typing import Any

#: The record name a plain message's body holds.
PLAIN = '@message'
#: Names of kinds, as names of apps: 1-64 of ``[A-Za-z0-9_.-]``.
_KIND_RE = re.compile(r'[A-Za-z0-9_.-]{1,64}')
#: Ordering keys are the sender's own words: any text up to this length.
MAX_KEY_CHARS = 255
#: How deeply a payload may nest lists and objects.  A payload is data for
#: a handler, not a document tree; the bound keeps a hostile peer's
#: thousand-level nesting from reaching code that recurses over it.
MAX_DEPTH = 64


def valid_kind(kind: Any) -> bool:
    return isinstance(kind, str) and _KIND_RE.fullmatch(kind) is not None


def check_kind(kind: Any) -> str:
    if not valid_kind(kind):
        raise ValueError(f'a message kind is 1-64 letters, digits, "_", "." or "-", '
                         f'not {kind!r:.80}')
    return kind


def check_key(key: Any) -> str | None:
    if key is None:
        return None
    if not (isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS):
        raise ValueError(f'an ordering key is a string of 1-{MAX_KEY_CHARS} characters '
                         'or None')
    return key


def depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply ``value`` nests lists and dicts, counted without
    recursion and up to ``limit + 1`` (a deeper value is not walked
    further)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, level)
        if level > limit:
            return level
        stack.extend((child, level + 1) for child in children)
    return deepest


def check_fields(fields: Any) -> tuple[str, Any, str | None, str | None]:
    """(kind, payload, key, sent_at) of a plain message body's object;
    ValueError saying what is wrong (one line, safe to show the peer)."""
    if not isinstance(fields, dict):
        raise ValueError(f'{PLAIN} must be a JSON object')
    unknown = set(fields) - {'kind', 'payload', 'key', 'sent_at'}
    if unknown:
        raise ValueError(f'{PLAIN} has unknown fields {sorted(unknown)[:5]}')
    if 'payload' not in fields:
        raise ValueError(f'{PLAIN} needs a "payload" (null is one)')
    kind = check_kind(fields.get('kind'))
    key = check_key(fields.get('key'))
    sent_at = fields.get('sent_at')
    if sent_at is not None and not (isinstance(sent_at, str) and len(sent_at) <= 40):
        raise ValueError('"sent_at" must be a time as text')
    if depth(fields['payload']) > MAX_DEPTH:
        raise ValueError(f'the payload nests more than {MAX_DEPTH} levels deep')
    return kind, fields['payload'], key, sent_at


def ordering_key(sender: str, fields: Any) -> tuple | None:
    """The key that orders a plain message behind a failed one of the
    same kind, key and sender (None: it waits behind nothing)."""
    if not isinstance(fields, dict) or fields.get('key') is None:
        return None
    return (PLAIN, sender, fields.get('kind'), fields['key'])
