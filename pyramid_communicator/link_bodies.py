"""What the body of a link message holds, and the check both ends make
of it.

A many-to-many link (:mod:`.links`) travels as a change of membership,
never as the whole collection, in the queues like a record (so that it
gets the transactional outbox, storing once, failures kept and retried).
Its body names the reserved record name :data:`LINK`::

    {"@link": {"record": "post", "relationship": "tags",
               "owner": ["central", 7], "target": ["facade", 3],
               "linked": true, "stamp": [1733540000000000, "facade"]}}

``owner`` and ``target`` are the identities (origin, original id) of the
two records, as a foreign key's ``refs`` are; ``linked`` says whether the
link is there after the change, and ``stamp`` is the edit's (hlc, app),
by which concurrent changes of the same link settle (the later stamp
wins).  It is written in :data:`.wire.LINK_FORMAT`, newer than records and
plain messages: an older version of this add-on keeps it waiting for an
upgrade instead of failing it.

This module imports nothing of the add-on, so that :mod:`.wire` (which
checks arrivals) and :mod:`.links` (which sends and applies) can both
use it.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

#: The record name a link message's body holds.
LINK = '@link'
#: The largest hlc a stamp may carry (as :data:`.versions.MAX_HLC`).
MAX_HLC = 2 ** 62
_FIELDS = frozenset({'record', 'relationship', 'owner', 'target', 'linked', 'stamp'})


@dataclasses.dataclass(frozen=True)
class LinkChange:
    """A checked link message's fields."""
    record: str
    relationship: str
    owner: tuple[str, int]
    target: tuple[str, int]
    linked: bool
    hlc: int
    app: str


def _name(value: Any) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and value.isprintable()


def _identity(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and _name(value[0])
            and isinstance(value[1], int) and not isinstance(value[1], bool)
            and abs(value[1]) < 2 ** 63)


def check_fields(fields: Any) -> LinkChange:
    """The link message's fields, or ValueError saying (in one line) what
    is wrong with them."""
    if not isinstance(fields, dict) or set(fields) != _FIELDS:
        raise ValueError(f'{LINK} holds exactly {", ".join(sorted(_FIELDS))}')
    if not _name(fields['record']) or not _name(fields['relationship']):
        raise ValueError('"record" and "relationship" must be names of 1-64 characters')
    if not _identity(fields['owner']) or not _identity(fields['target']):
        raise ValueError('"owner" and "target" must be [origin, id]')
    if not isinstance(fields['linked'], bool):
        raise ValueError('"linked" must be true or false')
    stamp = fields['stamp']
    if not (isinstance(stamp, list) and len(stamp) == 2 and isinstance(stamp[0], int)
            and not isinstance(stamp[0], bool) and 0 < stamp[0] <= MAX_HLC
            and _name(stamp[1])):
        raise ValueError('"stamp" must be [hlc, app]')
    return LinkChange(fields['record'], fields['relationship'], tuple(fields['owner']),
                      tuple(fields['target']), fields['linked'], stamp[0], stamp[1])


def named(body: str, local_name: str) -> str:
    """A stored link body as sent: this app, stored as ``''`` (publishing
    runs in any session of the host, which does not know the app's name),
    named.  Other bodies come back as they are."""
    data = json.loads(body)
    fields = data.get(LINK) if isinstance(data, dict) else None
    if not isinstance(fields, dict):
        return body
    for key in ('owner', 'target', 'stamp'):
        value = fields.get(key)
        index = 1 if key == 'stamp' else 0
        if isinstance(value, list) and len(value) == 2 and value[index] == '':
            value[index] = local_name
    return json.dumps(data, separators=(',', ':'), ensure_ascii=False)
