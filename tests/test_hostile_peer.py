"""A compromised peer against the trust rule (docs/security.rst).

Central is the side that must stay safe when the facade is broken into.
A hand-written hostile facade (``tests/hostile.py``, real HTTP on
loopback) serves crafted messages to central's real client and takes its
pushes; each attack runs central's sync engine against it and then
checks what a user of central cares about:

- nothing outside what was shared is written: central's own tables are
  as before, except for what the attack may legitimately change;
- nothing private is sent back: no pushed body carries a private value,
  even after central edits its private records;
- central's own app can still save every record.

The OWASP API Top 10 classes these play: broken object-level
authorisation (private records by natural key, by foreign key, by a new
life of an identity, by a UUID key, by a composite key's foreign key part,
by a many-to-many link), mass assignment (primary keys, excluded columns,
forged versions), unsafe consumption of APIs (unversioned and malformed
messages).  Resource consumption and server-side request forgery by
replies are in ``test_hostile_client.py``; failed logins in
``test_throttle.py``.

The other direction, a hostile central against a facade, posts the same
kinds of messages to the facade's ``/messages.json``.
"""
from __future__ import annotations

import dataclasses
import gzip
import json
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Side
from hostile import head, hostile_server, json_reply
from sqlalchemy import ForeignKey, Integer, MetaData, String, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_views import basic

from pyramid_communicator import authority, publish, receives_from
from pyramid_communicator.demo.models import Comment, Note, Post, Tag
from pyramid_communicator.keys import handle_of
from pyramid_communicator.link_bodies import named
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import Communicator
from pyramid_communicator.versions import now_hlc

HOUR = 3600 * 1_000_000


class HostileBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('hostile_ruled', autopublish=True, conflicts=authority('central'))
class Ruled(HostileBase):
    """A model central has the last word on."""
    __tablename__ = 'hostile_ruled'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str | None] = mapped_column(String(100))


@receives_from('hostile_currency')
class Currency(HostileBase):
    """A keyed model: the code is the record on every side."""
    __tablename__ = 'hostile_currencies'
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))


@receives_from('hostile_price')
class Price(HostileBase):
    """Points at a currency by its code (a foreign key to a keyed model)."""
    __tablename__ = 'hostile_prices'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    amount: Mapped[str | None] = mapped_column(String(20))
    currency_code: Mapped[str | None] = mapped_column(ForeignKey('hostile_currencies.code'))


@receives_from('hostile_line', autopublish=True, deletes=True)
class Line(HostileBase):
    """A composite key whose first part is a foreign key to a synced model
    (the demo's posts): a line of a post, at a position."""
    __tablename__ = 'hostile_lines'
    post_id: Mapped[int] = mapped_column(ForeignKey(Post.__table__.c.id), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    text: Mapped[str | None] = mapped_column(String(100))


# -- the hostile facade ----------------------------------------------------------

class HostileFacade:
    """Serves ``serving`` to pulls until they are acknowledged, and keeps
    what central pushes."""

    def __init__(self) -> None:
        self.serving: list[dict[str, Any]] = []
        self.acknowledged: set[int] = set()
        self.pushed: list[dict[str, Any]] = []
        #: Headers its answer to central's checkpoint carries (None: it
        #: keeps no checkpoints, as a gem).
        self.checkpoint: dict[str, str] | None = None
        #: Its answer to every ``/verify.json`` request.
        self.verify_reply: Any = None

    def handler(self, request) -> list:
        headers = {'X_Communicator_Name': 'facade', 'X_Communicator_Protocol': 2}
        path = urllib.parse.urlsplit(request.path).path
        body = request.body
        if request.headers.get('content-encoding') == 'gzip':
            body = gzip.decompress(body)
        if request.method == 'POST' and path == '/messages.json':
            self.pushed.extend(json.loads(body))
            if self.checkpoint is not None and 'x-communicator-checkpoint' in request.headers:
                return json_reply({'received': 0}, **headers,
                                  **{k.replace('-', '_'): v for k, v in self.checkpoint.items()})
            return json_reply({'received': 0}, **headers)
        if request.method == 'POST' and path == '/messages/delivered.json':
            self.acknowledged.update(json.loads(body)['ids'])
            return json_reply({'acknowledged': 0}, **headers)
        if request.method == 'POST' and path == '/verify.json':
            return json_reply(self.verify_reply, **headers)
        if request.method == 'GET' and path == '/messages.json':
            return json_reply([m for m in self.serving if m['id'] not in self.acknowledged],
                              **headers)
        return [head('404 Not Found', Content_Length=0)]

    def serve(self, *messages: dict[str, Any]) -> None:
        first = max((m['id'] for m in self.serving), default=0) + 1
        self.serving.extend({**m, 'id': first + n} for n, m in enumerate(messages))


@dataclasses.dataclass
class Central:
    side: Side
    facade: HostileFacade
    url: str
    #: ids of records shared with the facade, and of private ones
    ids: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def settings(self) -> Any:
        return parse_settings({
            'communicator.name': 'central', 'communicator.username': 'u',
            'communicator.password': 'p', 'communicator.base_uri': self.url,
            'communicator.timeout': '10', 'communicator.retry_delay': '0'})

    def run(self, push: bool = True, pull: bool = True) -> None:
        communicator = Communicator(self.settings, self.side.engine)
        try:
            communicator.communicate(push=push, pull=pull)
        finally:
            communicator.close()

    def inbound(self) -> list[dict[str, Any]]:
        return self.side.rows('inbound_messages')


PRIVATE_VALUES = ('Central only', 'private body', 'internal', 'Private ruling',
                  'Private note', 'Private line')


def make_world(side: Side) -> dict[str, int]:
    """Records shared with the peer, and private ones it must never reach."""
    ids = {}
    with side.session() as session:
        shared = Post(title='Shared', body='b', slug='shared')
        secret = Post(title='Central only', body='private body', slug='secret')
        session.add_all([shared, secret])
        session.flush()
        comment = Comment(post_id=shared.id, body='on shared')  # autopublished
        tag = Tag(name='shared-tag', label='Shared tag')  # autopublished
        ruled = Ruled(title='Ruled by central')  # autopublished
        note = Note(title='Shared note')  # autopublished
        line = Line(post_id=shared.id, position=1, text='Shared line')  # autopublished
        session.add_all([comment, tag, ruled, note, line])
        session.flush()
        shared.tags.append(tag)
        session.flush()
        # Posts are published by hand (with their tags): the secret never is.
        publish(session, shared)
        ids.update(shared=shared.id, secret=secret.id, comment=comment.id, tag=tag.id,
                   ruled=ruled.id, note=note.id)
    # Made without the ORM's events: never published.
    private_note = uuid.UUID('00000000-0000-4000-8000-00000000beef')
    with side.engine.begin() as conn:
        conn.execute(text("INSERT INTO tags (name, label) VALUES ('internal', 'Internal')"))
        conn.execute(text("INSERT INTO hostile_ruled (title) VALUES ('Private ruling')"))
        conn.execute(Note.__table__.insert().values(id=private_note, title='Private note'))
        conn.execute(Line.__table__.insert().values(post_id=ids['secret'], position=1,
                                                    text='Private line'))
        ids['private_note'] = private_note
        ids['internal'] = conn.execute(text("SELECT id FROM tags WHERE name = 'internal'")
                                       ).scalar()
        ids['private_ruled'] = conn.execute(
            text("SELECT id FROM hostile_ruled WHERE title = 'Private ruling'")).scalar()
    return ids


@pytest.fixture
def central(make_side) -> Iterator[Central]:
    side = make_side('central')
    HostileBase.metadata.create_all(side.engine)
    facade = HostileFacade()
    with hostile_server(facade.handler) as server:
        world = Central(side, facade, server.url)
        world.ids = make_world(side)
        world.run()  # the shared records go out
        assert side.count('outbound_messages', 'delivered_at IS NULL') == 0
        yield world
    side.engine.dispose()
    HostileBase.metadata.drop_all(side.engine)


#: The host's tables, each in an order of its own.
HOST_TABLES = {'posts': 'id', 'comments': 'id', 'tags': 'id', 'hostile_ruled': 'id',
               'notes': 'id', 'post_tags': 'post_id, tag_id',
               'hostile_lines': 'post_id, position'}


def host_state(side: Side) -> dict[str, list[dict[str, Any]]]:
    return {table: side.rows(table, order) for table, order in HOST_TABLES.items()}


# -- messages a compromised facade sends -------------------------------------------

def edit(app: str, *attributes: str, hlc: int | None = None, **clock: int) -> dict[str, Any]:
    """A version claiming a fresh edit of ``attributes`` by ``app``."""
    hlc = hlc or now_hlc()
    return {'clock': {app: hlc, **clock}, 'stamps': {key: [hlc, app] for key in attributes}}


def deletion(app: str, **clock: int) -> dict[str, Any]:
    hlc = now_hlc()
    return {'clock': {app: hlc, **clock}, 'deleted': [hlc, app]}


def message(name: str, attributes: dict[str, Any], origin: str, original_id: int,
            version: dict[str, Any] | None, refs: dict[str, list] | None = None,
            signature: str | None = None, format: int = 2) -> dict[str, Any]:
    data = {'id': 0, 'body': json.dumps({name: attributes}), 'origin': origin,
            'original_id': original_id, 'format': format}
    if version is not None:
        data['version'] = version
    if refs is not None:
        data['refs'] = refs
    if signature is not None:
        data['signature'] = signature
    return data


def keyed(name: str, attributes: dict[str, Any], origin: str, original_id: int,
          version: dict[str, Any], refs: dict[str, list] | None = None) -> dict[str, Any]:
    """A message of a record whose key is its identity (wire format 4)."""
    return message(name, attributes, origin, original_id, version, refs, format=4)


def handle(*key: Any) -> int:
    """The original id a keyed record travels under: its key's handle."""
    return handle_of(json.dumps(key[0] if len(key) == 1 else list(key)))


def link(owner: list, target: list, linked: bool = True,
         stamp: list | None = None) -> dict[str, Any]:
    """A change of a post's tags (a many-to-many link message)."""
    fields = {'record': 'post', 'relationship': 'tags', 'owner': owner, 'target': target,
              'linked': linked, 'stamp': stamp or [now_hlc(), 'facade']}
    return {'id': 0, 'body': json.dumps({'@link': fields}), 'format': 4}


def central_clock(side: Side, name: str, local_id: int) -> int:
    """Central's own hlc of a record, as the facade was sent it."""
    with side.engine.connect() as conn:
        version = conn.execute(text(
            "SELECT version FROM communicator_mappings WHERE name = :name AND "
            "local_id = :id AND origin = ''"), {'name': name, 'id': local_id}).scalar()
    return json.loads(version)['clock']['']


#: attack -> (messages given central's ids and sent clock, the refusal's words)
Attack = Callable[[dict[str, int], Callable[[str, int], int]], list[dict[str, Any]]]

ATTACKS: dict[str, tuple[Attack, str]] = {
    'delete a private record by its natural key': (
        lambda ids, sent: [message('tag', {'name': 'internal'}, 'facade', 901,
                                   deletion('facade'))],
        'which was never sent to it'),
    'take a private record over: delete an identity, then reuse it': (
        lambda ids, sent: [
            message('tag', {'name': 'decoy'}, 'facade', 902, deletion('facade')),
            message('tag', {'name': 'internal', 'label': 'Taken over'}, 'facade', 902,
                    edit('facade', 'name', 'label', hlc=now_hlc() + 1000))],
        'which was never sent to it'),
    'attach a new record to a private parent with a raw foreign key': (
        lambda ids, sent: [message('comment', {'body': 'x', 'post_id': ids['secret']},
                                   'facade', 903, edit('facade', 'body', 'post_id'))],
        'without saying whom it refers to'),
    'point a shared record at a private parent with a raw foreign key': (
        lambda ids, sent: [message('comment', {'post_id': ids['secret']}, 'central',
                                   ids['comment'],
                                   edit('facade', 'post_id',
                                        central=sent('comment', ids['comment'])))],
        'without saying whom it refers to'),
    'point a shared record at a private parent through refs': (
        lambda ids, sent: [message('comment', {'post_id': ids['secret']}, 'central',
                                   ids['comment'],
                                   edit('facade', 'post_id',
                                        central=sent('comment', ids['comment'])),
                                   refs={'post_id': ['central', ids['secret']]})],
        'which was never sent to it'),
    'address a private record by its id': (
        lambda ids, sent: [message('post', {'title': 'Hijacked'}, 'central', ids['secret'],
                                   edit('facade', 'title'))],
        'which was never sent to it'),
    'start a new life of a shared record': (
        lambda ids, sent: [message('post', {'title': 'New life'}, 'central', ids['shared'],
                                   {**edit('facade', 'title'), 'life': 1})],
        'only its origin can'),
    'delete a shared record in a new life': (
        lambda ids, sent: [message('tag', {'name': 'shared-tag'}, 'central', ids['tag'],
                                   {**deletion('facade'), 'life': 3})],
        'only its origin can'),
    'claim to have seen central an hour ahead': (
        lambda ids, sent: [message('hostile_ruled', {'title': 'Facade wins?'}, 'central',
                                   ids['ruled'],
                                   edit('facade', 'title', central=now_hlc() + HOUR))],
        'that central never sent it'),
    "claim an edit labelled central's": (
        lambda ids, sent: [message('hostile_ruled', {'title': 'Facade wins?'}, 'central',
                                   ids['ruled'],
                                   {'clock': {'facade': now_hlc()},
                                    'stamps': {'title': [now_hlc() + HOUR, 'central']}})],
        'that central never sent it'),
    "claim a delete labelled central's": (
        lambda ids, sent: [message('tag', {'name': 'shared-tag'}, 'central', ids['tag'],
                                   {'clock': {'facade': now_hlc(),
                                              'central': sent('tag', ids['tag'])},
                                    'deleted': [sent('tag', ids['tag']), 'central']})],
        'claims a delete by central'),
    'grow a version with made-up apps': (
        lambda ids, sent: [message('post', {'title': 'Bloat'}, 'central', ids['shared'],
                                   edit('facade', 'title', **{f'app{n}': 1 for n in range(50)}))],
        'which central does not know of'),
    'grow a version past the wire limit': (
        lambda ids, sent: [message('post', {'title': 'Bloat'}, 'central', ids['shared'],
                                   edit('facade', 'title', **{f'a{n}': 1 for n in range(300)}))],
        '"version" must be'),
    'create a record under another origin': (
        lambda ids, sent: [message('post', {'title': 'Forged origin'}, 'elsewhere', 5,
                                   edit('facade', 'title'))],
        'may create records of its own origin only'),
    "echo a record of central's that central never made, with a forged signature": (
        lambda ids, sent: [message('post', {'title': 'Forged echo'}, 'central', 9999,
                                   edit('central', 'title', hlc=now_hlc() - HOUR),
                                   signature='ab' * 32)],
        'signature does not verify'),
    "echo central's private record with a forged signature": (
        lambda ids, sent: [message('tag', {'name': 'internal', 'label': 'Echoed'}, 'central',
                                   ids['internal'], edit('central', 'label', hlc=now_hlc()),
                                   signature='0' * 64)],
        'signature does not verify'),
    "echo a lost record of central's without a signature": (
        lambda ids, sent: [message('post', {'title': 'Unsigned echo'}, 'central', 9998,
                                   edit('central', 'title', hlc=now_hlc() - HOUR))],
        'which was never sent to it'),
    'echo with a malformed signature': (
        lambda ids, sent: [message('post', {'title': 'Echo'}, 'central', 9997,
                                   edit('central', 'title'), signature='not hex')],
        '"signature" must be'),
    'overwrite without a version': (
        lambda ids, sent: [message('hostile_ruled', {'title': 'No version'}, 'central',
                                   ids['ruled'], None)],
        'without a version'),
    # -- a UUID key: the private note's, which the facade may have guessed
    'create a record under the UUID of a private one': (
        lambda ids, sent: [keyed('note', {'id': str(ids['private_note']), 'title': 'Mine'},
                                 'facade', 904, edit('facade', 'id', 'title'))],
        'which was never sent to it'),
    'update a private record by its UUID': (
        lambda ids, sent: [keyed('note', {'id': str(ids['private_note']), 'title': 'Mine'},
                                 'central', handle(str(ids['private_note'])),
                                 edit('facade', 'title'))],
        'which was never sent to it'),
    'delete a private record by its UUID': (
        lambda ids, sent: [keyed('note', {'id': str(ids['private_note'])}, 'facade', 905,
                                 deletion('facade'))],
        'which was never sent to it'),
    'give a shared record the UUID of a private one': (
        lambda ids, sent: [keyed('note', {'id': str(ids['private_note']), 'title': 'Moved'},
                                 'central', handle(str(ids['note'])),
                                 edit('facade', 'id', 'title', central=sent(
                                     'note', handle(str(ids['note'])))))],
        'keys never change'),
    # -- a composite key whose foreign key part names the private post
    'create a line of a private post': (
        lambda ids, sent: [keyed('hostile_line', {'post_id': ids['secret'], 'position': 2,
                                                  'text': 'Planted'},
                                 'facade', 906, edit('facade', 'post_id', 'position', 'text'),
                                 refs={'post_id': ['central', ids['secret']]})],
        'which was never sent to it'),
    'take over the line of a private post by its key': (
        lambda ids, sent: [keyed('hostile_line', {'post_id': ids['secret'], 'position': 1,
                                                  'text': 'Taken over'},
                                 'facade', 907, edit('facade', 'post_id', 'position', 'text'),
                                 refs={'post_id': ['central', ids['secret']]})],
        'which was never sent to it'),
    'create a line of a private post with a raw foreign key': (
        lambda ids, sent: [keyed('hostile_line', {'post_id': ids['secret'], 'position': 2,
                                                  'text': 'Planted'},
                                 'facade', 908, edit('facade', 'post_id', 'position', 'text'))],
        'without saying whom it refers to'),
    'delete the line of a private post by its key': (
        lambda ids, sent: [keyed('hostile_line', {'post_id': ids['secret'], 'position': 1},
                                 'facade', 909, deletion('facade'),
                                 refs={'post_id': ['central', ids['secret']]})],
        'which was never sent to it'),
    # -- many-to-many: links naming records never shared
    'tag a private post with a shared tag': (
        lambda ids, sent: [link(['central', ids['secret']], ['central', ids['tag']])],
        'which was never sent to it'),
    'give a shared post a private tag': (
        lambda ids, sent: [link(['central', ids['shared']], ['central', ids['internal']])],
        'which was never sent to it'),
    "remove a shared link, stamped as central's change": (
        lambda ids, sent: [link(['central', ids['shared']], ['central', ids['tag']],
                                linked=False, stamp=[now_hlc() + HOUR, 'central'])],
        'stamped by central'),
}


def refusals(central: Central) -> list[str]:
    return [row['last_error'] for row in central.inbound() if row['refused_at'] is not None]


@pytest.mark.parametrize('attack', ATTACKS)
def test_a_compromised_facade_cannot_reach_past_what_was_shared(central, attack):
    build, reason = ATTACKS[attack]
    side = central.side
    before = host_state(side)
    private_mappings = side.count('communicator_mappings',
                                  f"name = 'post' AND local_id = {central.ids['secret']}")
    keyed_before = keyed_mappings(side)
    central.facade.serve(*build(central.ids, lambda name, i: central_clock(side, name, i)))
    central.run()

    assert host_state(side) == before, attack
    assert any(reason in error for error in refusals(central)), refusals(central)
    assert side.count('inbound_messages', 'processed_at IS NOT NULL AND refused_at IS NULL'
                      ) <= 1  # the decoy delete of an identity of the facade's own
    assert side.count('communicator_mappings',
                      f"name = 'post' AND local_id = {central.ids['secret']}") == \
        private_mappings == 0
    # Nor did a private note or line gain an identity, or the private post a link.
    assert keyed_mappings(side) == keyed_before
    assert side.count('communicator_links', f"owner_id = {central.ids['secret']}") == 0
    assert 'refused' in central_status(central)
    nothing_private_goes_out(central)
    central_still_saves_every_record(central)


def keyed_mappings(side: Side) -> list[tuple]:
    """The identities of notes and lines central holds (the shared ones)."""
    return sorted((row['name'], row['origin'], row['original_id'], row['local_key'])
                  for row in side.rows('communicator_mappings')
                  if row['name'] in ('note', 'hostile_line') and row['local_id'] is not None)


def central_status(central: Central) -> str:
    from pyramid_communicator.status import format_status, queue_status
    with central.side.session() as session:
        return format_status(queue_status(session, 'central'))


def central_still_saves_every_record(central: Central) -> None:
    """Central's app edits and saves each of its records (autopublish and
    publish run as in a request; autopublish then sends the private tag and
    ruling too: the app's own choice), and a push carries them."""
    with central.side.session() as session:
        for cls in (Post, Comment, Tag, Ruled, Note, Line):
            for record in session.scalars(select(cls)):
                if cls is Comment:
                    record.body = f'{record.body} (edited)'
                elif cls is Line:
                    record.text = f'{record.text} (edited)'
                elif cls is Tag:
                    record.label = f'{record.label} (edited)'
                else:
                    record.title = f'{record.title} (edited)'
                session.flush()
                if cls is Post and record.slug == 'shared':
                    record.tags = []  # and its tags change
                    publish(session, record)
    central.run()
    assert central.side.count('outbound_messages', 'delivered_at IS NULL') == 0


def nothing_private_goes_out(central: Central) -> None:
    """Also not once central edits its private post (never published)."""
    with central.side.session() as session:
        session.get(Post, central.ids['secret']).body = 'private body, edited'
    central.run()
    for pushed in central.facade.pushed:
        for value in PRIVATE_VALUES:
            assert value not in pushed['body'], pushed


@pytest.mark.parametrize('checkpoint', [
    {'X-Communicator-Epoch': 'not hex', 'X-Communicator-Checkpoint': '- same',
     'X-Communicator-Received': '0', 'X-Communicator-Acknowledged': '0'},
    {'X-Communicator-Epoch': 'ab' * 8, 'X-Communicator-Checkpoint': '- same',
     'X-Communicator-Received': str(2 ** 60), 'X-Communicator-Acknowledged': '0'},
    {'X-Communicator-Epoch': 'ab' * 8, 'X-Communicator-Checkpoint': '\x1b[2J - same',
     'X-Communicator-Received': '0', 'X-Communicator-Acknowledged': '0'},
], ids=['bad epoch', 'id past the limit', 'escape codes'])
def test_a_malformed_checkpoint_fails_the_run_and_writes_nothing(central, checkpoint):
    from pyramid_communicator.client import PeerError
    before = host_state(central.side)
    outbound = central.side.rows('outbound_messages')
    central.facade.checkpoint = checkpoint
    with pytest.raises(PeerError, match='invalid checkpoint'):
        central.run()
    assert host_state(central.side) == before
    assert central.side.rows('outbound_messages') == outbound


#: A facade's lying checkpoint reply: "central was restored and holds nothing".
RESTORED_EMPTY = {
    'X-Communicator-Epoch': 'cd' * 8, 'X-Communicator-Checkpoint': '- differs',
    'X-Communicator-Received': '0', 'X-Communicator-Acknowledged': '0'}


def test_a_lying_checkpoint_makes_central_send_again_only_what_it_sent(central):
    """The facade claims a restore that lost everything (a checkpoint that
    differs, nothing received): central sends again what it had delivered,
    never a record it did not share, and its app still saves every record."""
    side = central.side
    before = host_state(side)
    # A link's body is kept with central's name left out, and named as sent.
    sent = {row['id']: named(row['body'], 'central') for row in side.rows('outbound_messages')}
    central.facade.pushed.clear()
    central.facade.checkpoint = RESTORED_EMPTY
    central.run()
    assert host_state(side) == before
    assert sorted(m['body'] for m in central.facade.pushed) == sorted(sent.values())
    assert side.count('outbound_messages', 'delivered_at IS NULL') == 0
    central.facade.checkpoint = None
    nothing_private_goes_out(central)
    central_still_saves_every_record(central)


def test_echoes_are_taken_back_only_as_central_signed_them(central):
    """The facade claims central was restored and echoes central's own
    records back.  Only what central's key signed, exactly, is taken back
    (and changes nothing central still holds); a changed body, version or
    identity under a genuine signature is refused or changes nothing, and
    central's tables stay as they were."""
    side = central.side
    before = host_state(side)
    [shared] = [m for m in central.facade.pushed if m['original_id'] == central.ids['shared']
                and json.loads(m['body']).keys() == {'post'}]
    assert len(shared['signature']) == 64  # central signs the records it publishes
    genuine = {key: shared[key] for key in
               ('body', 'origin', 'original_id', 'version', 'format', 'signature')}
    post = json.loads(shared['body'])['post']
    later = now_hlc()
    forged = [
        {**genuine, 'body': json.dumps({'post': {**post, 'title': 'Tampered'}})},
        {**genuine, 'original_id': central.ids['secret']},  # another record's id
        {**genuine, 'original_id': 9999},  # a record central never made
        {**genuine, 'version': {**shared['version'], 'clock': {'central': later},
                                'stamps': {'title': [later, 'central']}}},
    ]
    central.facade.checkpoint = RESTORED_EMPTY
    central.facade.serve(genuine, *forged)
    central.run()
    central.facade.checkpoint = None

    assert host_state(side) == before
    # Moved to a record central does not share, or never made: only an
    # echo could bring those, and the signature does not verify.  On the
    # record it shares, the message is the facade's plain claim (a facade
    # signs its own edits of central's records): the newer "central" edit
    # is refused by the trust rule, the changed body wins nothing.
    reasons = refusals(central)
    assert sum('signature does not verify' in reason for reason in reasons) == 2
    assert sum('central never sent it' in reason for reason in reasons) == 1
    assert len(reasons) == 3, reasons
    status = central_status(central)
    assert 'echoes: 1 of our own messages taken back' in status and '2 refused' in status
    nothing_private_goes_out(central)
    central_still_saves_every_record(central)


def test_echoes_of_central_edits_of_facade_records_are_taken_back_only_as_signed(central):
    """Central signs its edits of the facade's records too, so that a
    restored central can take them back.  A facade echoing a forged or
    changed "central edit" of one of its records gets it refused: a
    signature central's key did not make (or none) cannot claim an edit
    of central's past what central holds, and a genuine echo of an edit
    central holds changes nothing."""
    side = central.side
    central.facade.serve(message('post', {'title': 'From the facade', 'body': 'f'},
                                 'facade', 77, edit('facade', 'title', 'body')))
    central.run()
    with side.session() as session:
        post = session.scalars(select(Post).where(Post.title == 'From the facade')).one()
        post.body = 'edited by central'
        session.flush()
        publish(session, post)
    central.run()
    [shared] = [m for m in central.facade.pushed if m['origin'] == 'facade'
                and m['original_id'] == 77]
    assert len(shared['signature']) == 64  # central signs its edits of facade records
    genuine = {key: shared[key] for key in
               ('body', 'origin', 'original_id', 'version', 'format', 'signature')}
    body = json.loads(shared['body'])['post']
    later = now_hlc()
    claimed = {'clock': {**shared['version']['clock'], 'central': later},
               'stamps': {**shared['version']['stamps'], 'body': [later, 'central']}}
    tampered = json.dumps({'post': {**body, 'body': 'Tampered'}})
    forged = [
        {**genuine, 'body': tampered},
        {**genuine, 'version': claimed},
        {**genuine, 'body': tampered, 'version': claimed, 'signature': 'ab' * 32},
        {key: value for key, value in {**genuine, 'version': claimed, 'body': tampered}
         .items() if key != 'signature'},  # unsigned
        # Dressed as the facade's own edit, with a newer "central" stamp.
        {**genuine, 'body': tampered, 'signature': '0' * 64,
         'version': {**claimed, 'stamps': {**claimed['stamps'],
                                           'title': [later, 'facade']}}},
    ]
    before = host_state(side)
    central.facade.checkpoint = RESTORED_EMPTY
    central.facade.serve(genuine, *forged)
    central.run()
    central.facade.checkpoint = None

    assert host_state(side) == before
    # The changed body under the genuine signature is the facade's plain
    # message (its record, its title edit): it claims only central's edit
    # central holds, which wins nothing.  Every newer "central" claim is
    # refused.
    reasons = refusals(central)
    assert len(reasons) == 4, reasons
    assert all('central never sent it' in reason for reason in reasons)
    assert 'echoes: 1 of our own messages taken back' in central_status(central)
    nothing_private_goes_out(central)
    central_still_saves_every_record(central)


@pytest.mark.parametrize('reply', [
    [], 'x', {'name': 'facade'}, {'origins': {'central': 'many'}},
    {'origins': {'central': [10 ** 30, 'ab', 1, 2]}},
    {'summaries': [[1, 'x', 0, 0]] * 10_000}, {'records': [['central', 1, {}, {}]]},
], ids=['array', 'string', 'no answer', 'bad summary', 'huge count', 'too many',
        'unasked records'])
def test_junk_verify_replies_fail_verify_and_repair_and_write_nothing(central, reply):
    from pyramid_communicator.client import Client, PeerError
    from pyramid_communicator.repair import repair
    from pyramid_communicator.verify import Verifier
    side = central.side
    before = host_state(side)
    outbound = side.rows('outbound_messages')
    central.facade.verify_reply = reply
    client = Client(central.settings)
    try:
        with pytest.raises(PeerError):
            Verifier(side.engine, 'central', client).run(['post', 'tag'])
        with pytest.raises(PeerError):
            repair(side.engine, central.settings, client, ['post', 'tag'], 'central')
    finally:
        client.close()
    assert host_state(side) == before
    assert side.rows('outbound_messages') == outbound


def test_a_forged_clock_waits_until_the_edit_it_claims_is_delivered(central):
    """The facade cannot know central's unsent edit; if it names it anyway
    (its hlc guessed), the message waits until that edit is delivered,
    and only then is the facade's edit causally after it."""
    side = central.side
    with side.session() as session:
        ruled = session.get(Ruled, central.ids['ruled'])
        ruled.title = 'Central edit, not pushed yet'
    guessed = central_clock(side, 'hostile_ruled', central.ids['ruled'])
    central.facade.serve(message('hostile_ruled', {'title': 'Facade edit'}, 'central',
                                 central.ids['ruled'],
                                 edit('facade', 'title', central=guessed)))
    central.run(push=False)
    assert side.rows('hostile_ruled')[0]['title'] == 'Central edit, not pushed yet'
    [waiting] = central.inbound()
    assert waiting['processed_at'] is None and waiting['refused_at'] is None
    assert 'not delivered yet' in waiting['last_error']

    central.run()  # the edit is pushed, then the facade's message is retried
    assert side.rows('hostile_ruled')[0]['title'] == 'Facade edit'


def test_authority_holds_against_a_concurrent_edit(central):
    """What the facade may do honestly: an edit concurrent with central's
    unsent one loses under authority('central')."""
    side = central.side
    sent = central_clock(side, 'hostile_ruled', central.ids['ruled'])
    with side.session() as session:
        session.get(Ruled, central.ids['ruled']).title = 'Central edit'
    central.facade.serve(message('hostile_ruled', {'title': 'Facade edit'}, 'central',
                                 central.ids['ruled'],
                                 edit('facade', 'title', hlc=now_hlc() + 10 ** 6,
                                      central=sent)))
    central.run(push=False)
    assert side.rows('hostile_ruled')[0]['title'] == 'Central edit'
    [conflict] = side.rows('communicator_conflicts')
    assert (conflict['winner'], conflict['policy']) == ('local', 'authority:central')


def test_mass_assignment_of_keys_and_excluded_columns_is_ignored(central):
    """A shared comment's allowed attribute changes; its primary key and
    the column the model excludes do not."""
    side = central.side
    before = side.rows('comments')
    central.facade.serve(message(
        'comment', {'id': 999, 'title': 'Injected', 'body': 'Edited on the facade'},
        'central', central.ids['comment'],
        edit('facade', 'body', 'title', central=central_clock(side, 'comment',
                                                              central.ids['comment']))))
    central.run()
    [after] = side.rows('comments')
    assert after == {**before[0], 'body': 'Edited on the facade'}


def test_a_foreign_key_to_a_private_keyed_record_is_refused(central):
    """A currency's code is its identity on both sides, so a price names
    its currency by the code itself.  The facade can create a price of a
    currency it was sent, but neither create one nor re-point a shared one
    at a currency central never shared."""
    side = central.side
    with side.session() as session:
        session.add(Currency(code='EUR', name='Euro'))
        session.flush()
        publish(session, session.get(Currency, 'EUR'))
        price = Price(amount='10', currency_code='EUR')
        session.add(price)
        session.flush()
        publish(session, price)
        price_id = price.id
    with side.engine.begin() as conn:
        conn.execute(text("INSERT INTO hostile_currencies (code, name) "
                          "VALUES ('XAU', 'Central only gold')"))
    central.run()  # the euro and its price go out
    currencies, prices = side.rows('hostile_currencies', 'code'), side.rows('hostile_prices')
    sent = central_clock(side, 'hostile_price', price_id)
    central.facade.serve(
        message('hostile_price', {'amount': '1', 'currency_code': 'XAU'}, 'facade', 904,
                edit('facade', 'amount', 'currency_code')),
        message('hostile_price', {'amount': '10', 'currency_code': 'XAU'}, 'central',
                price_id, edit('facade', 'currency_code', central=sent)),
        message('hostile_price', {'amount': '2', 'currency_code': 'EUR'}, 'facade', 905,
                edit('facade', 'amount', 'currency_code')))
    central.run()

    assert side.rows('hostile_currencies', 'code') == currencies
    assert [(p['amount'], p['currency_code']) for p in side.rows('hostile_prices')] == [
        (p['amount'], p['currency_code']) for p in prices] + [('2', 'EUR')]
    reasons = refusals(central)
    assert len(reasons) == 2
    assert all('hostile_price.currency_code referring to hostile_currency "XAU" of central, '
               'which was never sent to it' in reason for reason in reasons), reasons


# -- the other direction: a hostile central against a facade --------------------------

REVERSE: dict[str, tuple[Callable[[dict[str, int]], list[dict[str, Any]]], str]] = {
    'delete a private record by its natural key': (
        lambda ids: [message('tag', {'name': 'internal'}, 'central', 901,
                             deletion('central'))],
        'which was never sent to it'),
    'attach to a private parent with a raw foreign key': (
        lambda ids: [message('comment', {'body': 'x', 'post_id': ids['secret']}, 'central',
                             903, edit('central', 'body', 'post_id'))],
        'without saying whom it refers to'),
    'address a private record by its id': (
        lambda ids: [message('post', {'title': 'Hijacked'}, 'facade', ids['secret'],
                             edit('central', 'title'))],
        'which was never sent to it'),
    'claim to have seen the facade an hour ahead': (
        lambda ids: [message('post', {'title': 'Central wins?'}, 'facade', ids['shared'],
                             edit('central', 'title', facade=now_hlc() + HOUR))],
        'that facade never sent it'),
    'start a new life of a shared record': (
        lambda ids: [message('post', {'title': 'New life'}, 'facade', ids['shared'],
                             {**edit('central', 'title'), 'life': 1})],
        'only its origin can'),
    "echo a record of the facade's that it never made, with a forged signature": (
        lambda ids: [message('post', {'title': 'Forged echo'}, 'facade', 9999,
                             edit('facade', 'title', hlc=now_hlc() - HOUR),
                             signature='ab' * 32)],
        'signature does not verify'),
    "echo the facade's private record with a forged signature": (
        lambda ids: [message('tag', {'name': 'internal', 'label': 'Echoed'}, 'facade',
                             ids['internal'], edit('facade', 'label'), signature='0' * 64)],
        'signature does not verify'),
    'overwrite without a version': (
        lambda ids: [message('post', {'title': 'No version'}, 'facade', ids['shared'], None)],
        'without a version'),
}


@pytest.fixture
def facade_app(make_side, webapp):
    side = make_side('facade')
    HostileBase.metadata.create_all(side.engine)
    ids = make_world(side)
    with side.engine.begin() as conn:  # central pulled and acknowledged them
        conn.execute(text('UPDATE outbound_messages SET delivered_at = created_at'))
    yield side, webapp(side), ids
    side.engine.dispose()
    HostileBase.metadata.drop_all(side.engine)


@pytest.mark.parametrize('attack', REVERSE)
def test_a_compromised_central_cannot_reach_past_what_was_shared(facade_app, attack):
    side, app, ids = facade_app
    build, reason = REVERSE[attack]
    before = host_state(side)
    messages = [{**m, 'id': n} for n, m in enumerate(build(ids), 1)]
    response = app.post('/messages.json', json.dumps(messages), headers={
        **basic(), 'Content-Type': 'application/json', 'X-Communicator-Name': 'central'})
    assert response.status_int == 202
    assert host_state(side) == before
    errors = [row['last_error'] for row in side.rows('inbound_messages')]
    assert any(reason in (error or '') for error in errors), errors
