"""Signatures of the record messages an app authors (of its own records,
and its edits and deletes of the peer's).

HMAC-SHA256, keyed with a secret only the signing app holds
(:func:`.echoes.signing_key`), over what makes the message's meaning: its
identity (origin, original_id), body, version and references, in their
wire form.  The message id is left out on purpose: an echo
(:mod:`.echoes`) comes back under the peer's message ids.  Pure
functions, so that :mod:`.wire` can sign as it writes.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
from typing import Any

#: Hex digits of a signature.
LENGTH = 64
_SIGNATURE = re.compile(f'[0-9a-f]{{{LENGTH}}}')
#: Keeps a signature of this kind from ever meaning anything else.
_DOMAIN = 'pyramid_communicator/signature/1'


def well_formed(signature: Any) -> bool:
    return isinstance(signature, str) and _SIGNATURE.fullmatch(signature) is not None


def _payload(origin: str, original_id: int, body: str, version: dict[str, Any],
             refs: dict[str, list] | None) -> bytes:
    # Canonical JSON: the peer re-serializes what it stored, key order aside.
    return json.dumps([_DOMAIN, origin, original_id, body, version, refs or None],
                      sort_keys=True, separators=(',', ':'), ensure_ascii=True).encode()


def sign(key: bytes, origin: str, original_id: int, body: str, version: dict[str, Any],
         refs: dict[str, list] | None) -> str:
    return hmac.new(key, _payload(origin, original_id, body, version, refs),
                    hashlib.sha256).hexdigest()


def verify(key: bytes, signature: str | None, origin: str, original_id: int, body: str,
           version: dict[str, Any] | None, refs: dict[str, list] | None) -> bool:
    """True only for a signature ``key`` made of exactly these fields."""
    if not well_formed(signature) or version is None or original_id is None:
        return False
    return hmac.compare_digest(signature, sign(key, origin, original_id, body, version, refs))
