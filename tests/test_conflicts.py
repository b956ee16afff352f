"""Versions, conflicts, deletes and the trust boundary (issue 6), as users
see them: what each database holds after the apps exchanged.

Most tests run on the real pair: the facade served by waitress, central's
``pcommunicate`` as a subprocess, records made through the demo models
(Post published by hand, Tag autopublished with ``deletes`` and
``match_on``).  A hostile or replaying peer is played by writing rows
straight into its ``outbound_messages`` table, which it then serves as
its own.

Policies the demo does not use (``authority``, a merge callable) and
models with ``accept`` limits are test-only models on a Base of their
own; both sides run in this process and messages travel the way the
engine carries them (``store_inbound``, then ``apply_inbound``).
"""
from __future__ import annotations

import json
import re
import types
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import Central, Server, Side
from sqlalchemy import ForeignKey, Integer, MetaData, String, create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from pyramid_communicator import Conflict, authority, publish, publish_delete, receives_from
from pyramid_communicator.demo.models import Post, Tag
from pyramid_communicator.inbox import ApplyResult
from pyramid_communicator.models import NAMING_CONVENTION, utcnow
from pyramid_communicator.queues import store_inbound
from pyramid_communicator.settings import CommunicatorSettings, parse_settings
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.versions import now_hlc
from pyramid_communicator.wire import WireMessage, outbound_to_wire

# -- helpers for the real pair ---------------------------------------------------


def execute(side: Side, sql: str, **params: Any) -> int:
    """Change a side's database behind the apps' backs; the rowcount."""
    with side.engine.begin() as conn:
        return conn.execute(text(sql), params).rowcount


def central_post(central: Central, **fields: Any) -> int:
    """A post made and published on central, as the central app would."""
    with central.side.session() as session:
        post = Post(**fields)
        session.add(post)
        session.flush()
        publish(session, post)
        return post.id


def edit_central_post(central: Central, post_id: int, **fields: Any) -> None:
    with central.side.session() as session:
        post = session.get(Post, post_id)
        for key, value in fields.items():
            setattr(post, key, value)
        session.flush()
        publish(session, post)


def posts(side: Side) -> dict[str, dict[str, Any]]:
    """Posts by slug: their synced attributes."""
    with side.session() as session:
        return {post.slug: {'title': post.title, 'body': post.body}
                for post in session.scalars(select(Post))}


def central_tag(central: Central, **fields: Any) -> int:
    """A tag made on central (autopublished when flushed)."""
    with central.side.session() as session:
        tag = Tag(**fields)
        session.add(tag)
        session.flush()
        return tag.id


def edit_central_tag(central: Central, tag_id: int, **fields: Any) -> None:
    with central.side.session() as session:
        tag = session.get(Tag, tag_id)
        for key, value in fields.items():
            setattr(tag, key, value)


def facade_tag(facade: Server, **fields: Any) -> int:
    response = requests.post(facade.url + '/tags', json=fields, timeout=10)
    response.raise_for_status()
    return response.json()['id']


def edit_facade_tag(facade: Server, tag_id: int, **fields: Any) -> None:
    requests.post(f'{facade.url}/tags/{tag_id}', json=fields, timeout=10).raise_for_status()


def delete_facade_tag(facade: Server, tag_id: int) -> None:
    requests.delete(f'{facade.url}/tags/{tag_id}', timeout=10).raise_for_status()


def tags(side: Side) -> dict[str, tuple]:
    """Tags by name: (label, color, weight)."""
    return {row['name']: (row['label'], row['color'], row['weight'])
            for row in side.rows('tags')}


def mapped(side: Side, name: str, origin: str, original_id: int) -> int | None:
    """The local record an identity stands for (None: a tombstone); a
    ValueError when the side never heard of it."""
    [local_id] = [row['local_id'] for row in side.rows('communicator_mappings')
                  if (row['name'], row['origin'], row['original_id']) ==
                  (name, origin, original_id)]
    return local_id


def conflicts(side: Side) -> list[dict[str, Any]]:
    return side.rows('communicator_conflicts')


def status(central: Central) -> dict[str, Any]:
    return json.loads(central.sync('--status', '--json'))


def replay(side: Side, message_id: int) -> None:
    """Send an old outbound message again under a new id, as a peer that
    replays (or a message that took a long detour) would."""
    execute(side, 'INSERT INTO outbound_messages (body, origin, original_id, refs, version, '
                  'created_at) SELECT body, origin, original_id, refs, version, created_at '
                  'FROM outbound_messages WHERE id = :id', id=message_id)


def outbound_ids(side: Side) -> list[int]:
    return [row['id'] for row in side.rows('outbound_messages')]


def forge(side: Side, name: str, attributes: dict[str, Any], origin: str | None,
          original_id: int | None, version: dict[str, Any] | None,
          refs: dict[str, list] | None = None) -> None:
    """A message written by hand into a side's outbound queue: what a
    hostile peer, or the gem (no version), sends."""
    execute(side, 'INSERT INTO outbound_messages (body, origin, original_id, refs, version, '
                  'created_at) VALUES (:body, :origin, :original_id, :refs, :version, :at)',
            body=json.dumps({name: attributes}), origin=origin, original_id=original_id,
            refs=None if refs is None else json.dumps(refs),
            version=None if version is None else json.dumps(version), at=utcnow())


def stamps(app: str, *attributes: str) -> dict[str, Any]:
    """A version claiming a fresh edit of ``attributes`` by ``app``."""
    hlc = now_hlc()
    return {'clock': {app: hlc}, 'stamps': {key: [hlc, app] for key in attributes}}


def deletion(app: str) -> dict[str, Any]:
    hlc = now_hlc()
    return {'clock': {app: hlc}, 'deleted': [hlc, app]}


def inbound_failures(side: Side) -> list[dict[str, Any]]:
    return [row for row in side.rows('inbound_messages') if row['processed_at'] is None]


# -- 1, 2, 5: concurrent edits of a record on both sides --------------------------

def test_same_attribute_edited_on_both_sides_ends_identical_with_the_newer_edit(pair):
    """The issue's bug: each side used to overwrite the other's edit with
    its own, and the two databases stayed different for good.  Here the
    facade's edit is the newer (central's newer edit: the --status test)."""
    central, facade = pair
    post_id = central_post(central, title='Original', body='b', slug='p')
    central.sync()
    facade_id = mapped(facade.side, 'post', 'central', post_id)

    edit_central_post(central, post_id, title='Central title')
    facade.update_post(facade_id, title='Facade title')  # later: the newer edit
    central.sync()
    central.sync()

    assert posts(central.side) == posts(facade.side) == {
        'p': {'title': 'Facade title', 'body': 'b'}}
    for side, peer, local_id, mine, theirs, winner in (
            (central.side, 'facade', post_id, 'Central title', 'Facade title', 'remote'),
            (facade.side, 'central', facade_id, 'Facade title', 'Central title', 'local')):
        [conflict] = conflicts(side)
        assert (conflict['name'], conflict['origin'], conflict['original_id'],
                conflict['local_id'], conflict['attribute']) == (
            'post', 'central', post_id, local_id, 'title')
        assert json.loads(conflict['local_value']) == mine
        assert json.loads(conflict['remote_value']) == theirs
        assert json.loads(conflict['kept_value']) == 'Facade title'
        assert conflict['winner'] == winner
        assert re.fullmatch(rf'\d+@{side.name}', conflict['local_stamp'])
        assert re.fullmatch(rf'\d+@{peer}', conflict['remote_stamp'])
        assert (conflict['policy'], conflict['peer']) == ('newest', peer)
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []


def test_edits_of_different_attributes_merge_without_conflict(pair):
    central, facade = pair
    post_id = central_post(central, title='Original', body='original body', slug='p')
    central.sync()

    facade.update_post(mapped(facade.side, 'post', 'central', post_id), body='facade body')
    edit_central_post(central, post_id, title='Central title')
    central.sync()

    expected = {'p': {'title': 'Central title', 'body': 'facade body'}}
    assert posts(central.side) == posts(facade.side) == expected
    assert conflicts(central.side) == conflicts(facade.side) == []


@pytest.mark.slow
def test_status_counts_conflicts_and_json_lists_them(pair):
    central, facade = pair
    tag_id = central_tag(central, name='news', label='News', weight=1)
    central.sync()

    edit_facade_tag(facade, mapped(facade.side, 'tag', 'central', tag_id), label='Facade')
    edit_central_tag(central, tag_id, label='Central', weight=2)
    central.sync()

    assert re.search(r'^conflicts: 1 in the last 24h, 1 in all', central.sync('--status'),
                     re.M)
    report = status(central)
    assert {key: report['conflicts'][key] for key in ('recent', 'total')} == {
        'recent': 1, 'total': 1}
    [listed] = report['conflicts']['latest']
    assert {key: listed[key] for key in (
        'record', 'origin', 'original_id', 'local_id', 'attribute', 'local_value',
        'remote_value', 'kept_value', 'winner', 'policy', 'peer')} == {
        'record': 'tag', 'origin': 'central', 'original_id': tag_id, 'local_id': tag_id,
        'attribute': 'label', 'local_value': '"Central"', 'remote_value': '"Facade"',
        'kept_value': '"Central"', 'winner': 'local', 'policy': 'newest', 'peer': 'facade'}
    assert re.fullmatch(r'\d+@central', listed['local_stamp'])
    assert re.fullmatch(r'\d+@facade', listed['remote_stamp'])
    assert listed['at'].endswith('Z')
    assert tags(central.side) == tags(facade.side) == {'news': ('Central', None, 2)}


# -- 4: stale and replayed messages ------------------------------------------------

@pytest.mark.slow
def test_a_replayed_old_message_never_overwrites_newer_data(pair):
    central, facade = pair
    post_id = central_post(central, title='v1', body='b', slug='p')
    central.sync()
    facade_id = mapped(facade.side, 'post', 'central', post_id)
    for number in (2, 3):
        facade.update_post(facade_id, title=f'facade v{number}')
        edit_central_post(central, post_id, body=f'central body {number}')
        central.sync()
    expected = {'p': {'title': 'facade v3', 'body': 'central body 3'}}
    assert posts(central.side) == posts(facade.side) == expected

    # Old messages of each side come again, under new ids: stored, seen
    # to be stale, applied without changing anything or making conflicts.
    replay(facade.side, outbound_ids(facade.side)[0])  # title 'facade v2'
    replay(central.side, outbound_ids(central.side)[0])  # the create: 'v1', 'b'
    replay(central.side, outbound_ids(central.side)[1])  # 'central body 2'
    before = [side.count('inbound_messages') for side in (central.side, facade.side)]
    central.sync()

    assert [side.count('inbound_messages') for side in (central.side, facade.side)] == [
        before[0] + 1, before[1] + 2]
    assert posts(central.side) == posts(facade.side) == expected
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []
    assert conflicts(central.side) == conflicts(facade.side) == []


# -- 6: match_on, and what happens without it ------------------------------------

@pytest.mark.slow
def test_tags_created_with_the_same_name_on_both_sides_become_one_record(pair):
    central, facade = pair
    central_id = central_tag(central, name='python', label='Python (central)')
    facade_id = facade_tag(facade, name='python', label='Python (facade)', color='blue')

    central.sync()

    assert central.side.count('tags') == facade.side.count('tags') == 1
    assert tags(central.side) == tags(facade.side)
    # Where the two creates differ, the newer one (the facade's) wins.
    assert tags(central.side) == {'python': ('Python (facade)', 'blue', None)}
    assert mapped(central.side, 'tag', 'facade', facade_id) == central_id
    assert mapped(facade.side, 'tag', 'central', central_id) == facade_id
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []
    for side in (central.side, facade.side):  # both settled the two creates alike
        assert {(c['attribute'], json.loads(c['kept_value'])) for c in conflicts(side)} == {
            ('label', 'Python (facade)'), ('color', 'blue')}

    # Later edits on either side travel to the other's record.
    edit_facade_tag(facade, facade_id, weight=5)
    edit_central_tag(central, central_id, label='Python')
    central.sync()
    assert tags(central.side) == tags(facade.side) == {'python': ('Python', 'blue', 5)}
    assert central.side.count('tags') == facade.side.count('tags') == 1

    # A delete by either identity deletes the one record on both sides.
    delete_facade_tag(facade, facade_id)
    central.sync()
    assert tags(central.side) == tags(facade.side) == {}
    for side in (central.side, facade.side):
        assert side.count('communicator_mappings', 'local_id IS NOT NULL') == 0
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []


def test_without_match_on_the_same_unique_key_on_both_sides_is_a_kept_failure(pair):
    central, facade = pair
    central_post(central, title='Central', slug='same')
    facade.create_post(title='Facade', slug='same')

    central.sync()

    for side in (central.side, facade.side):
        [failed] = inbound_failures(side)
        assert failed['last_error'].startswith('IntegrityError: ')
        assert 'match_on' in failed['last_error']
        assert failed['refused_at'] is None and failed['failed_at'] is not None
    assert [p['title'] for p in posts(central.side).values()] == ['Central']
    assert [p['title'] for p in posts(facade.side).values()] == ['Facade']
    shown = central.sync('--status')
    assert re.search(r'^inbound: .* 1 failed, 0 refused,', shown, re.M)
    assert re.search(r'^failed #\d+ \(from facade #\d+, 1 attempts, next attempt due now\): '
                     r'IntegrityError', shown, re.M)


# -- 7: deletes ----------------------------------------------------------------------

def test_a_tag_deleted_on_the_facade_is_deleted_on_central_and_back(pair):
    central, facade = pair
    from_facade = facade_tag(facade, name='facade-made', label='F')
    from_central = central_tag(central, name='central-made', label='C')
    central.sync()
    assert set(tags(central.side)) == set(tags(facade.side)) == {'facade-made', 'central-made'}

    delete_facade_tag(facade, from_facade)
    with central.side.session() as session:  # the delete is autopublished
        session.delete(session.get(Tag, from_central))
    central.sync()

    assert tags(central.side) == tags(facade.side) == {}
    # Tombstones remember the deleted identities on both sides.
    for side in (central.side, facade.side):
        assert {(row['origin'], row['original_id'], row['local_id'])
                for row in side.rows('communicator_mappings')} == {
            ('' if side.name == 'facade' else 'facade', from_facade, None),
            ('' if side.name == 'central' else 'central', from_central, None)}
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []


@pytest.mark.slow
def test_a_late_update_does_not_bring_a_deleted_tag_back(pair):
    central, facade = pair
    tag_id = facade_tag(facade, name='gone', label='first')
    edit_facade_tag(facade, tag_id, label='second')
    central.sync()
    assert tags(central.side) == {'gone': ('second', None, None)}

    delete_facade_tag(facade, tag_id)
    central.sync()
    assert tags(central.side) == {}

    for message_id in outbound_ids(facade.side)[:2]:  # the create and the update
        replay(facade.side, message_id)
    central.sync()

    assert tags(central.side) == tags(facade.side) == {}
    assert mapped(central.side, 'tag', 'facade', tag_id) is None
    assert inbound_failures(central.side) == []
    assert conflicts(central.side) == []


def test_update_concurrent_with_a_delete_loses_to_the_delete(pair):
    central, facade = pair
    tag_id = central_tag(central, name='contested', label='before')
    central.sync()
    facade_id = mapped(facade.side, 'tag', 'central', tag_id)

    delete_facade_tag(facade, facade_id)
    edit_central_tag(central, tag_id, label='edited while deleted elsewhere')
    central.sync()

    assert tags(central.side) == tags(facade.side) == {}
    for side in (central.side, facade.side):
        [conflict] = conflicts(side)
        assert conflict['attribute'] is None
        assert (conflict['name'], conflict['origin'], conflict['original_id']) == (
            'tag', 'central', tag_id)
        assert json.loads(conflict['kept_value']) == 'deleted'
        # The deleting side keeps its delete, the updating side takes it.
        assert conflict['winner'] == ('local' if side is facade.side else 'remote')
    assert json.loads(conflicts(central.side)[0]['local_value'])['label'] == (
        'edited while deleted elsewhere')
    assert json.loads(conflicts(facade.side)[0]['local_value']) == 'deleted'
    assert inbound_failures(central.side) == inbound_failures(facade.side) == []


@pytest.mark.slow
def test_a_delete_message_for_a_model_without_deletes_is_refused(pair):
    central, facade = pair
    post_id = central_post(central, title='Keep me', slug='keep')
    central.sync()

    forge(facade.side, 'post', {}, 'central', post_id, deletion('facade'))
    central.sync()

    assert posts(central.side) == {'keep': {'title': 'Keep me', 'body': None}}
    [refused] = inbound_failures(central.side)
    assert refused['refused_at'] is not None
    assert refused['last_error'] == (
        'refused: post does not accept deletes from facade (receives_from(..., deletes=True))')
    report = status(central)
    assert (report['inbound']['failed'], report['inbound']['refused']) == (0, 1)
    [failure] = report['failures']
    assert (failure['id'], failure['refused'], failure['error']) == (
        refused['id'], True, refused['last_error'])

    with central.side.session() as session:
        with pytest.raises(ValueError, match='post does not publish deletes'):
            publish_delete(session, session.get(Post, post_id))
    assert central.side.count('posts') == 1


# -- 8: the trust boundary ------------------------------------------------------------

def test_a_hostile_peer_cannot_touch_records_never_sent_to_it(pair):
    central, facade = pair
    post_id = central_post(central, title='Shared', slug='shared')
    with central.side.session() as session:  # made, never published
        secret = Post(title='Central only', body='private', slug='secret')
        session.add(secret)
        session.flush()
        secret_id = secret.id
    # A central tag that never crossed: written without the ORM's events.
    execute(central.side, "INSERT INTO tags (name, label) VALUES ('internal', 'Internal')")
    tag_id = central.side.rows('tags')[0]['id']
    central.sync()

    forge(facade.side, 'post', {'title': 'Hijacked'}, 'central', secret_id,
          stamps('facade', 'title'))
    forge(facade.side, 'post', {'body': 'gem-style, no version'}, 'central', secret_id, None)
    forge(facade.side, 'tag', {}, 'central', tag_id, deletion('facade'))
    forge(facade.side, 'comment', {'post_id': secret_id, 'body': 'on the secret'}, 'facade', 7,
          stamps('facade', 'post_id', 'body'), refs={'post_id': ['central', secret_id]})
    forge(facade.side, 'tag', {'name': 'internal', 'label': 'Taken over'}, 'facade', 8,
          stamps('facade', 'name', 'label'))  # a create meeting it by its match_on key
    forge(facade.side, 'post', {'title': 'Allowed'}, 'central', post_id,
          stamps('facade', 'title'))  # a record it was sent: fine
    central.sync()

    assert posts(central.side) == {'shared': {'title': 'Allowed', 'body': None},
                                   'secret': {'title': 'Central only', 'body': 'private'}}
    assert tags(central.side) == {'internal': ('Internal', None, None)}
    assert central.side.count('comments') == 0
    assert central.side.count('communicator_mappings', "origin <> ''") == 0
    never_sent = 'of central, which was never sent to it'
    assert [row['last_error'] for row in inbound_failures(central.side)] == [
        # The facade signs its edits: for a record central does not hold,
        # only an echo could be that, and central's key did not sign it.
        f'refused: facade sent {secret_id} of central, which central does not hold, signed '
        'but not by central: an echo whose signature does not verify (forged or changed), '
        'or a record never sent to it: not applied',
        'refused: facade sent a message without a version, which only a gem peer may '
        '(communicator.gem_peer)',
        f'refused: facade sent {tag_id} of central, which central does not hold, signed '
        'but not by central: an echo whose signature does not verify (forged or changed), '
        'or a record never sent to it: not applied',
        f'refused: facade refers to post {secret_id} {never_sent}',
        f'refused: facade sent a tag whose name matches tag {tag_id} {never_sent}']
    shown = central.sync('--status')
    assert re.search(r'^inbound: .* 0 failed, 5 refused,', shown, re.M)
    assert re.search(r'^refused #\d+ \(from facade #\d+, 1 attempts\): refused: facade '
                     rf'sent {secret_id} of central, which central does not hold', shown, re.M)
    central.sync()  # refusals are not retried
    assert [row['attempts'] for row in inbound_failures(central.side)] == [1] * 5


# -- 9: the gem's messages, without versions ----------------------------------------

def test_an_unversioned_update_is_refused_from_a_peer_of_ours(pair):
    """Our apps always send versions: a message without one could only be
    forged, to overwrite what the version checks would keep."""
    central, facade = pair
    post_id = central_post(central, title='Versioned', body='b', slug='p')
    central.sync()

    forge(facade.side, 'post', {'title': 'No version'}, 'central', post_id, None)
    central.sync()
    assert posts(central.side) == {'p': {'title': 'Versioned', 'body': 'b'}}
    [refused] = inbound_failures(central.side)
    assert 'without a version' in refused['last_error']


@pytest.mark.slow
def test_an_unversioned_update_from_a_gem_peer_overwrites_a_versioned_record(
        make_side, serve, make_central):
    gem = {'communicator.gem_peer': 'true'}
    facade = serve(make_side('facade'))
    central = make_central(make_side('central'), facade.url, **gem)
    post_id = central_post(central, title='Versioned', body='b', slug='p')
    central.sync()

    forge(facade.side, 'post', {'title': 'From the gem'}, 'central', post_id, None)
    central.sync()
    assert posts(central.side) == {'p': {'title': 'From the gem', 'body': 'b'}}
    assert conflicts(central.side) == []

    # Versions go on from there: central's next edit carries the gem's
    # title too, as central's own newer value.
    edit_central_post(central, post_id, body='central body')
    central.sync()
    assert posts(central.side) == posts(facade.side) == {
        'p': {'title': 'From the gem', 'body': 'central body'}}


# -- in-process pairs for test-only models -------------------------------------------

class ConflictsBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('conflicts_ruled', autopublish=True, deletes=True,
               conflicts=authority('central'))
class Ruled(ConflictsBase):
    """Central has the last word."""
    __tablename__ = 'conflicts_ruled'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[int | None] = mapped_column(Integer)


#: What the merge callable was called with: (attribute, older, newer).
MERGE_CALLS: list[tuple[str, Any, Any]] = []


def merge_values(conflict: Conflict) -> Any:
    MERGE_CALLS.append((conflict.attribute, conflict.older, conflict.newer))
    if conflict.attribute == 'score':
        return max(conflict.older.value, conflict.newer.value)
    return ' + '.join(sorted((conflict.older.value, conflict.newer.value)))


@receives_from('conflicts_merged', autopublish=True, conflicts=merge_values)
class Merged(ConflictsBase):
    __tablename__ = 'conflicts_merged'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str | None] = mapped_column(String(100))
    score: Mapped[int | None] = mapped_column(Integer)


@receives_from('conflicts_archived', deletes=True)
class Archived(ConflictsBase):
    """Deletes travel, but only by ``publish_delete``."""
    __tablename__ = 'conflicts_archived'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str | None] = mapped_column(String(100))


@receives_from('conflicts_parent', autopublish=True, deletes=True)
class Parent(ConflictsBase):
    __tablename__ = 'conflicts_parents'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str | None] = mapped_column(String(100))


class LocalChild(ConflictsBase):
    """Not synced: a local row that holds on to a synced parent."""
    __tablename__ = 'conflicts_local_children'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int] = mapped_column(ForeignKey('conflicts_parents.id'))


@receives_from('conflicts_announcement', autopublish=True, accept=())
class Announcement(ConflictsBase):
    """Publish-only: the peer gets it and may change nothing."""
    __tablename__ = 'conflicts_announcements'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str | None] = mapped_column(String(100))


@receives_from('conflicts_submission', accept=('create',))
class Submission(ConflictsBase):
    """The peer may hand in new ones, never change them afterwards."""
    __tablename__ = 'conflicts_submissions'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    text: Mapped[str | None] = mapped_column(String(100))


@receives_from('conflicts_ballot', accept=('create',), match_on=['code'])
class Ballot(ConflictsBase):
    """Create-only, with a natural key."""
    __tablename__ = 'conflicts_ballots'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(20), unique=True)
    text: Mapped[str | None] = mapped_column(String(100))


def with_test_tables(side: Side) -> Iterator[Side]:
    ConflictsBase.metadata.create_all(side.engine)
    yield side
    side.engine.dispose()
    ConflictsBase.metadata.drop_all(side.engine)


@pytest.fixture
def sides(make_side) -> Iterator[tuple[Side, Side]]:
    """(central, facade) with the test-only tables, talking in process."""
    central_side = make_side('central')
    facade_side = make_side('facade')
    central_tables = with_test_tables(central_side)
    facade_tables = with_test_tables(facade_side)
    next(central_tables), next(facade_tables)
    yield central_side, facade_side
    for tables in (central_tables, facade_tables):
        next(tables, None)


def settings_of(side: Side) -> CommunicatorSettings:
    return parse_settings({'communicator.name': side.name,
                           'communicator.username': 'user',
                           'communicator.password': 'secret',
                           'communicator.retry_delay': '0'})


def deliver(target: Side, sender: str, *messages: WireMessage) -> None:
    with target.session() as session:
        store_inbound(session, sender, messages)


def forward(source: Side, target: Side, engine: Engine | None = None) -> ApplyResult:
    """Carry ``source``'s undelivered messages to ``target`` as the wire
    does, then apply them there (on ``engine`` if given)."""
    rows = [row for row in source.rows('outbound_messages') if row['delivered_at'] is None]
    deliver(target, source.name,
            *(outbound_to_wire(types.SimpleNamespace(**row), source.name) for row in rows))
    execute(source, 'UPDATE outbound_messages SET delivered_at = :at '
                    'WHERE delivered_at IS NULL', at=utcnow())
    return apply_inbound(engine or target.engine, settings_of(target))


def exchange(central: Side, facade: Side) -> None:
    """What one pcommunicate run does: push, then pull, each applied."""
    forward(central, facade)
    forward(facade, central)


def add(side: Side, obj: Any) -> int:
    with side.session() as session:
        session.add(obj)
        session.flush()
        return obj.id


def change(side: Side, cls: type, record_id: int, **fields: Any) -> None:
    """Edit an autopublished record."""
    with side.session() as session:
        obj = session.get(cls, record_id)
        for key, value in fields.items():
            setattr(obj, key, value)


def values(side: Side, cls: type, keys: tuple[str, ...] = ('title', 'score')) -> list[tuple]:
    with side.session() as session:
        return [tuple(getattr(obj, key) for key in keys)
                for obj in session.scalars(select(cls).order_by(cls.id))]


def copy_id(side: Side, name: str, original_id: int) -> int | None:
    return mapped(side, name, 'central', original_id)


# -- 3: policies -----------------------------------------------------------------------

def test_under_authority_central_wins_even_against_a_newer_facade_edit(sides):
    central, facade = sides
    ruled = add(central, Ruled(title='original', score=1))
    exchange(central, facade)
    copy = copy_id(facade, 'conflicts_ruled', ruled)

    change(central, Ruled, ruled, title='central', score=2)
    change(facade, Ruled, copy, title='facade, newer')  # later: newer
    exchange(central, facade)

    assert values(central, Ruled) == values(facade, Ruled) == [('central', 2)]
    for side, winner in ((central, 'local'), (facade, 'remote')):
        [conflict] = conflicts(side)
        assert (conflict['attribute'], conflict['winner'], conflict['policy']) == (
            'title', winner, 'authority:central')
        assert json.loads(conflict['kept_value']) == 'central'

    exchange(central, facade)  # settled for good
    assert values(central, Ruled) == values(facade, Ruled) == [('central', 2)]
    assert len(conflicts(central)) == len(conflicts(facade)) == 1


def test_a_merge_callable_gets_the_same_order_on_both_sides(sides):
    central, facade = sides
    merged = add(central, Merged(title='original', score=1))
    exchange(central, facade)
    copy = copy_id(facade, 'conflicts_merged', merged)

    change(facade, Merged, copy, title='facade', score=7)
    change(central, Merged, merged, title='central', score=3)
    MERGE_CALLS.clear()
    forward(central, facade)
    at_facade = list(MERGE_CALLS)
    MERGE_CALLS.clear()
    forward(facade, central)
    at_central = list(MERGE_CALLS)

    assert values(central, Merged) == values(facade, Merged) == [('central + facade', 7)]
    assert sorted(at_central) == sorted(at_facade)
    [(_, older, newer), _] = sorted(at_central)  # score, then title
    assert (older.app, older.value, newer.app, newer.value) == ('facade', 7, 'central', 3)
    assert older.hlc < newer.hlc
    for side in (central, facade):
        assert {(c['attribute'], c['winner'], json.loads(c['kept_value']))
                for c in conflicts(side)} == {
            ('title', 'merged', 'central + facade'),
            ('score', 'remote' if side is central else 'local', 7)}
        assert {c['policy'] for c in conflicts(side)} == {'custom:merge_values'}

    exchange(central, facade)
    assert values(central, Merged) == values(facade, Merged) == [('central + facade', 7)]


@pytest.mark.parametrize('made_on', ['central', 'facade'])
def test_under_authority_centrals_update_survives_a_facade_delete(sides, made_on):
    central, facade = sides
    maker, other = (central, facade) if made_on == 'central' else (facade, central)
    original_id = add(maker, Ruled(title='original', score=1))
    exchange(central, facade)

    def local_id(side: Side) -> int:
        origin = '' if side is maker else made_on
        return mapped(side, 'conflicts_ruled', origin, original_id)

    with facade.session() as session:
        session.delete(session.get(Ruled, local_id(facade)))
    change(central, Ruled, local_id(central), score=2)
    exchange(central, facade)

    assert values(central, Ruled) == values(facade, Ruled) == [('original', 2)]
    for side, winner in ((central, 'local'), (facade, 'remote')):
        [conflict] = conflicts(side)
        assert (conflict['attribute'], conflict['winner']) == (None, winner)
    assert other.count('communicator_mappings') == maker.count('communicator_mappings') == 1

    # The facade's new copy is the same record: edits keep travelling.
    change(facade, Ruled, local_id(facade), title='facade')
    exchange(central, facade)
    assert values(central, Ruled) == values(facade, Ruled) == [('facade', 2)]
    change(central, Ruled, local_id(central), title='central')
    exchange(central, facade)
    assert values(central, Ruled) == values(facade, Ruled) == [('central', 2)]


def test_under_authority_a_central_delete_beats_a_facade_update(sides):
    central, facade = sides
    ruled = add(central, Ruled(title='original', score=1))
    exchange(central, facade)

    change(facade, Ruled, copy_id(facade, 'conflicts_ruled', ruled), score=5)
    with central.session() as session:
        session.delete(session.get(Ruled, ruled))
    exchange(central, facade)

    assert values(central, Ruled) == values(facade, Ruled) == []
    for side, winner in ((central, 'local'), (facade, 'remote')):
        [conflict] = conflicts(side)
        assert (conflict['attribute'], conflict['winner']) == (None, winner)
        assert json.loads(conflict['kept_value']) == 'deleted'


# -- 7: deletes of test-only models -------------------------------------------------

def test_publish_delete_by_hand_deletes_the_peers_copy(sides):
    central, facade = sides
    with central.session() as session:
        doc = Archived(title='old')
        session.add(doc)
        session.flush()
        publish(session, doc)
        doc_id = doc.id
        unsent = Archived(title='never sent')
        session.add(unsent)
    exchange(central, facade)
    assert values(facade, Archived, ('title',)) == [('old',)]

    with central.session() as session:
        for obj in session.scalars(select(Archived)).all():
            session.delete(obj)
            sent = publish_delete(session, obj)
            assert (sent is None) == (obj.title == 'never sent')
    assert central.count('outbound_messages', 'delivered_at IS NULL') == 1
    exchange(central, facade)

    assert values(central, Archived, ('title',)) == values(facade, Archived, ('title',)) == []
    assert mapped(facade, 'conflicts_archived', 'central', doc_id) is None
    assert inbound_failures(facade) == []


def sent_versions(side: Side) -> list[dict[str, Any]]:
    """The versions of a side's undelivered messages, as the wire carries them."""
    return [outbound_to_wire(types.SimpleNamespace(**row), side.name).version
            for row in side.rows('outbound_messages') if row['delivered_at'] is None]


def synced_then_deleted(side: Side, sides: tuple[Side, Side], tag: Tag) -> int:
    """Create ``tag`` on ``side``, sync it, delete it there and sync the
    delete; its id on ``side``."""
    tag_id = add(side, tag)
    exchange(*sides)
    with side.session() as session:
        session.delete(session.get(Tag, tag_id))
    exchange(*sides)
    return tag_id


def test_a_tag_created_under_the_id_of_a_deleted_one_is_a_new_life_of_it(sides):
    """An id handed out again (SQLite does; given here by hand) names a new
    record: its message carries the identity's next life, and the peer
    creates the tag instead of taking it for the deleted one."""
    central, facade = sides
    tag_id = synced_then_deleted(central, sides, Tag(name='first', label='1'))
    assert tags(facade) == {}

    add(central, Tag(id=tag_id, name='second', label='2'))
    [version] = sent_versions(central)
    assert version['life'] == 1 and set(version['clock']) == {'central'}
    exchange(central, facade)

    assert tags(central) == tags(facade) == {'second': ('2', None, None)}
    [row] = [row for row in facade.rows('communicator_mappings')
             if (row['origin'], row['original_id']) == ('central', tag_id)]
    assert row['local_id'] is not None and row['life'] == 1
    assert inbound_failures(facade) == []


def test_a_tag_created_again_with_a_name_deleted_elsewhere_comes_after_the_delete(sides):
    """A new record whose natural key was deleted (here by the peer)
    inherits that delete's clock: the peer sees it came after its delete
    and creates it again."""
    central, facade = sides
    synced_then_deleted(facade, sides, Tag(name='again', label='facade'))
    assert tags(central) == tags(facade) == {}

    add(central, Tag(name='again', label='central'))
    [version] = sent_versions(central)
    assert set(version['clock']) == {'central', 'facade'} and 'life' not in version
    exchange(central, facade)

    assert tags(central) == tags(facade) == {'again': ('central', None, None)}
    assert inbound_failures(central) == inbound_failures(facade) == []


@pytest.fixture
def foreign_keys(sides) -> Iterator[Engine]:
    """The facade's database with foreign keys enforced (SQLite needs
    a pragma on every connection; the others always do)."""
    engine = create_engine(sides[1].url)
    if engine.dialect.name == 'sqlite':
        @event.listens_for(engine, 'connect')
        def _on(dbapi_connection, record):
            dbapi_connection.execute('PRAGMA foreign_keys=ON')
    yield engine
    engine.dispose()


def test_a_delete_the_database_refuses_is_kept_as_a_failure(sides, foreign_keys):
    central, facade = sides
    parent = add(central, Parent(name='held'))
    exchange(central, facade)
    copy = copy_id(facade, 'conflicts_parent', parent)
    add(facade, LocalChild(parent_id=copy))

    with central.session() as session:
        session.delete(session.get(Parent, parent))
        session.add(Parent(name='other'))  # in the same batch, not held up
    result = forward(central, facade, engine=foreign_keys)

    assert (result.applied, result.failed) == (1, 1)
    [failed] = inbound_failures(facade)
    assert failed['last_error'].startswith('IntegrityError: ')
    assert failed['refused_at'] is None and failed['failed_at'] is not None
    assert sorted(row['name'] for row in facade.rows('conflicts_parents')) == ['held', 'other']
    assert copy_id(facade, 'conflicts_parent', parent) == copy  # no tombstone

    execute(facade, 'DELETE FROM conflicts_local_children')
    result = apply_inbound(foreign_keys, settings_of(facade))
    assert (result.applied, result.failed) == (1, 0)
    assert [row['name'] for row in facade.rows('conflicts_parents')] == ['other']
    assert copy_id(facade, 'conflicts_parent', parent) is None


# -- 8: what a model accepts -----------------------------------------------------------

def message(remote_id: int, name: str, attributes: dict[str, Any], origin: str,
            original_id: int) -> WireMessage:
    return WireMessage(remote_id, json.dumps({name: attributes}), origin, original_id,
                       version=stamps('facade', *attributes))


def test_a_publish_only_model_is_never_changed_by_the_peer(sides):
    central, _ = sides
    announcement = add(central, Announcement(text='Hello'))  # published: addressable
    deliver(central, 'facade',
            message(1, 'conflicts_announcement', {'text': 'Changed'}, 'central', announcement),
            message(2, 'conflicts_announcement', {'text': 'New'}, 'facade', 1))

    result = apply_inbound(central.engine, settings_of(central))

    assert (result.applied, result.failed) == (0, 2)
    assert [row['text'] for row in central.rows('conflicts_announcements')] == ['Hello']
    assert [row['last_error'] for row in inbound_failures(central)] == [
        'refused: conflicts_announcement does not accept updates from facade',
        'refused: conflicts_announcement does not accept creates from facade']
    assert all(row['refused_at'] is not None for row in inbound_failures(central))


def test_a_create_only_model_takes_creates_and_refuses_updates(sides):
    central, _ = sides
    deliver(central, 'facade',
            message(1, 'conflicts_submission', {'text': 'Handed in'}, 'facade', 4),
            message(2, 'conflicts_submission', {'text': 'Changed later'}, 'facade', 4),
            message(3, 'conflicts_submission', {'text': 'Another'}, 'facade', 5))

    result = apply_inbound(central.engine, settings_of(central))

    assert (result.applied, result.failed) == (2, 1)
    assert sorted(row['text'] for row in central.rows('conflicts_submissions')) == [
        'Another', 'Handed in']
    [refused] = inbound_failures(central)
    assert refused['last_error'] == (
        'refused: conflicts_submission does not accept updates from facade')


def test_a_create_only_model_refuses_a_create_that_meets_a_record_by_match_on(sides):
    """Taken as the same record, the create would change the local one:
    that is an update, which the model does not accept."""
    central, _ = sides
    with central.session() as session:
        ballot = Ballot(code='b1', text='cast on central')
        session.add(ballot)
        session.flush()
        publish(session, ballot)
    deliver(central, 'facade',
            message(1, 'conflicts_ballot', {'code': 'b1', 'text': 'recast'}, 'facade', 4),
            message(2, 'conflicts_ballot', {'code': 'b2', 'text': 'new'}, 'facade', 5))

    result = apply_inbound(central.engine, settings_of(central))

    assert (result.applied, result.failed) == (1, 1)
    assert {row['code']: row['text'] for row in central.rows('conflicts_ballots')} == {
        'b1': 'cast on central', 'b2': 'new'}
    [refused] = inbound_failures(central)
    assert refused['last_error'] == (
        'refused: conflicts_ballot does not accept updates from facade')


# -- clocks ---------------------------------------------------------------------

def test_a_host_whose_clock_is_ten_minutes_slow_still_wins_with_a_later_edit(
        make_side, monkeypatch):
    """Wall clocks may be minutes apart: an edit made after another was
    received wins, even on the host whose clock is behind; and concurrent
    edits end the same on both sides whatever the skew."""
    central, facade = make_side('central'), make_side('facade')
    slow = 10 * 60 * 1_000_000  # ten minutes, in microseconds
    real = now_hlc
    tag_id = add(facade, Tag(name='skew', label='from the facade'))
    forward(facade, central)

    monkeypatch.setattr('pyramid_communicator.versions.now_hlc', lambda: real() - slow)
    with central.session() as session:  # central, slow, edits after it received
        session.scalars(select(Tag)).one().label = 'central, later'
    forward(central, facade)
    assert tags(central) == tags(facade)
    assert tags(facade)['skew'][0] == 'central, later'
    assert conflicts(central) == conflicts(facade) == []

    # Concurrent edits: both sides settle on the same value.
    with central.session() as session:
        session.scalars(select(Tag)).one().color = 'slow central'
    monkeypatch.setattr('pyramid_communicator.versions.now_hlc', real)
    with facade.session() as session:
        session.get(Tag, tag_id).color = 'facade'
    exchange(central, facade)
    assert tags(central) == tags(facade)
    assert len(conflicts(central)) == len(conflicts(facade)) == 1


def test_a_version_from_far_in_the_future_is_refused(make_side):
    """No peer may push our clocks towards their limit."""
    facade = make_side('facade')
    future = now_hlc() + 2 * 24 * 3600 * 1_000_000
    deliver(facade, 'central', WireMessage(
        1, json.dumps({'tag': {'name': 'late'}}), 'central', 1, None,
        {'clock': {'central': future}, 'stamps': {'name': [future, 'central']}}))
    result = apply_inbound(facade.engine, settings_of(facade))
    assert (result.applied, result.failed) == (0, 1)
    [row] = facade.rows('inbound_messages')
    assert row['refused_at'] is not None and 'a day ahead' in row['last_error']
    assert facade.count('tags') == 0
