"""Many-to-many links (``relationship(secondary=...)``) between synced
models: they travel as membership changes, settle per link by their
stamps, and obey the trust rule (docs/models.rst, "Many-to-many").

Each test changes records on both sides through the ORM, carries the
outbound queues across as the wire would (``forward``) and applies them
the way the server and ``pcommunicate`` do; then it looks at the
association tables of both sides.
"""
from __future__ import annotations

import dataclasses
import json
import random
import types
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from pyramid import testing
from sqlalchemy import Column, ForeignKey, Integer, MetaData, String, Table, Uuid, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from test_records import deliver, forward, with_tables

from pyramid_communicator import publish, receives_from
from pyramid_communicator.inbox import ApplyResult
from pyramid_communicator.keys import handle
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.records import receiver_of
from pyramid_communicator.settings import REGISTRY_KEY, parse_settings
from pyramid_communicator.sync import apply_inbound
from pyramid_communicator.versions import now_hlc
from pyramid_communicator.wire import WireMessage, outbound_to_wire, parse_messages

if TYPE_CHECKING:
    from conftest import Side


class LinksBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


post_tags = Table(
    'links_post_tags', LinksBase.metadata,
    Column('post_id', ForeignKey('links_posts.id'), primary_key=True),
    Column('tag_id', ForeignKey('links_tags.id'), primary_key=True))
post_labels = Table(
    'links_post_labels', LinksBase.metadata,
    Column('post_id', ForeignKey('links_posts.id'), primary_key=True),
    Column('label_id', ForeignKey('links_labels.id'), primary_key=True))
note_tags = Table(
    'links_note_tags', LinksBase.metadata,
    Column('note_id', ForeignKey('links_notes.id'), primary_key=True),
    Column('tag_id', ForeignKey('links_tags.id'), primary_key=True))
draft_tags = Table(
    'links_draft_tags', LinksBase.metadata,
    Column('draft_id', ForeignKey('links_drafts.id'), primary_key=True),
    Column('tag_id', ForeignKey('links_tags.id'), primary_key=True))


@receives_from('links_tag', autopublish=True)
class LinkTag(LinksBase):
    __tablename__ = 'links_tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    #: The other direction of LinkPost.tags: its changes travel as those.
    posts: Mapped[list[LinkPost]] = relationship(secondary=post_tags, back_populates='tags')


@receives_from('links_label')
class LinkLabel(LinksBase):
    """Published by hand only: a label can be private to its side."""
    __tablename__ = 'links_labels'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('links_post', autopublish=True)
class LinkPost(LinksBase):
    __tablename__ = 'links_posts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[LinkTag]] = relationship(secondary=post_tags, back_populates='posts')
    labels: Mapped[list[LinkLabel]] = relationship(secondary=post_labels)


@receives_from('links_note', autopublish=True, exclude=['tags'])
class LinkNote(LinksBase):
    """Its tags stay on each side."""
    __tablename__ = 'links_notes'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[LinkTag]] = relationship(secondary=note_tags)


memo_tags = Table(
    'links_memo_tags', LinksBase.metadata,
    Column('memo_id', ForeignKey('links_memos.id'), primary_key=True),
    Column('tag_id', ForeignKey('links_tags.id'), primary_key=True))
pinned_tags = Table(
    'links_pinned_tags', LinksBase.metadata,
    Column('pinned_id', ForeignKey('links_pinned.id'), primary_key=True),
    Column('tag_id', ForeignKey('links_tags.id'), primary_key=True))


@receives_from('links_memo', autopublish=True, only=['title'])
class LinkMemo(LinksBase):
    """An allow-list without its tags: they stay on each side."""
    __tablename__ = 'links_memos'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[LinkTag]] = relationship(secondary=memo_tags)


@receives_from('links_pinned', autopublish=True, accept=())
class LinkPinned(LinksBase):
    """Publish-only: the peer changes neither it nor its links."""
    __tablename__ = 'links_pinned'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[LinkTag]] = relationship(secondary=pinned_tags)


@receives_from('links_draft')
class LinkDraft(LinksBase):
    """Published by hand, links and all."""
    __tablename__ = 'links_drafts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    tags: Mapped[list[LinkTag]] = relationship(secondary=draft_tags)


article_topics = Table(
    'links_article_topics', LinksBase.metadata,
    Column('article_code', ForeignKey('links_articles.code'), primary_key=True),
    Column('topic_id', ForeignKey('links_topics.id'), primary_key=True))


@receives_from('links_topic')
class LinkTopic(LinksBase):
    """Keyed by a UUID; published by hand only (one may stay private)."""
    __tablename__ = 'links_topics'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('links_article', autopublish=True)
class LinkArticle(LinksBase):
    """Keyed by its slug, linked to UUID-keyed topics."""
    __tablename__ = 'links_articles'
    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    title: Mapped[str] = mapped_column(String(50))
    topics: Mapped[list[LinkTopic]] = relationship(secondary=article_topics)


@pytest.fixture
def central(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('central'), LinksBase)


@pytest.fixture
def facade(make_side) -> Iterator[Side]:
    yield from with_tables(make_side('facade'), LinksBase)


def apply(side: Side) -> ApplyResult:
    return apply_inbound(side.engine, parse_settings({
        'communicator.name': side.name, 'communicator.username': 'user',
        'communicator.password': 'secret', 'communicator.retry_delay': '0'}))


def sync(*sides: Side) -> None:
    """One exchange both ways: each side's queue carried and applied."""
    central, facade = sides
    forward(central, facade)
    forward(facade, central)
    apply(facade)
    apply(central)


def create(side: Side, cls: type, **fields: Any) -> int:
    with side.session() as session:
        obj = cls(**fields)
        session.add(obj)
        session.flush()
        return obj.id


def local(side: Side, cls: type, title_or_name: str) -> Any:
    """The id of the record of that title (or name) on ``side``."""
    column = cls.title if hasattr(cls, 'title') else cls.name
    with side.session() as session:
        return session.scalars(select(cls.id).where(column == title_or_name)).one()


def change(side: Side, post: str, add: tuple[str, ...] = (),
           remove: tuple[str, ...] = ()) -> None:
    """Add and remove tags (by name) of the post of that title, in one flush."""
    with side.session() as session:
        found = session.scalars(select(LinkPost).where(LinkPost.title == post)).one()
        tags = {tag.name: tag for tag in session.scalars(select(LinkTag))}
        for name in add:
            found.tags.append(tags[name])
        for name in remove:
            found.tags.remove(tags[name])


def tags_of(side: Side, cls: type = LinkPost, attribute: str = 'tags',
            ) -> dict[str, list[str]]:
    """Every record's linked names, as a user of ``side`` sees them."""
    with side.session() as session:
        return {obj.title: sorted(linked.name for linked in getattr(obj, attribute))
                for obj in session.scalars(select(cls))}


def seeded(central: Side, facade: Side) -> None:
    """A post and tags a, b, c made on central, synced to the facade."""
    create(central, LinkPost, title='p')
    for name in 'abc':
        create(central, LinkTag, name=name)
    sync(central, facade)


def link_messages(side: Side) -> list[dict[str, Any]]:
    bodies = [json.loads(row['body']) for row in side.rows('outbound_messages')]
    return [body['@link'] for body in bodies if '@link' in body]


# -- membership changes travel ---------------------------------------------------

def test_a_link_added_on_either_side_arrives_on_the_other(central, facade):
    with central.session() as session:
        session.add(LinkPost(title='p', tags=[LinkTag(name='a'), LinkTag(name='b')]))
    sync(central, facade)
    assert tags_of(facade) == {'p': ['a', 'b']}

    create(facade, LinkTag, name='f')
    change(facade, 'p', add=('f',))
    sync(central, facade)
    assert tags_of(central) == tags_of(facade) == {'p': ['a', 'b', 'f']}


def test_a_removed_link_is_removed_on_the_other_side_and_records_stay(central, facade):
    seeded(central, facade)
    change(central, 'p', add=('a', 'b'))
    sync(central, facade)
    change(facade, 'p', remove=('a',))
    sync(central, facade)
    assert tags_of(central) == tags_of(facade) == {'p': ['b']}
    assert central.count('links_tags') == facade.count('links_tags') == 3


def test_changes_travel_as_membership_not_as_the_whole_list(central, facade):
    seeded(central, facade)
    change(central, 'p', add=('a', 'b'))
    forward(central, facade)
    change(central, 'p', add=('c',), remove=('a',))
    changes = sorted((m['target'][1], m['linked']) for m in link_messages(central)[-2:])
    assert changes == [(local(central, LinkTag, 'a'), False),
                       (local(central, LinkTag, 'c'), True)]


def test_a_change_made_through_the_other_direction_travels(central, facade):
    seeded(central, facade)
    with central.session() as session:
        tag = session.scalars(select(LinkTag).where(LinkTag.name == 'c')).one()
        tag.posts.append(session.scalars(select(LinkPost)).one())
    sync(central, facade)
    assert tags_of(facade) == {'p': ['c']}
    assert [m['relationship'] for m in link_messages(central)] == ['tags']


def test_concurrent_adds_on_both_sides_both_survive(central, facade):
    seeded(central, facade)
    change(central, 'p', add=('a',))
    change(facade, 'p', add=('b',))
    sync(central, facade)
    assert tags_of(central) == tags_of(facade) == {'p': ['a', 'b']}


@pytest.mark.parametrize('last', ['central', 'facade'])
def test_a_concurrent_add_and_remove_settle_by_the_later_change(central, facade, last):
    """Central removes the link; the facade, not knowing, removes it and
    adds it again.  The later of the two changes wins on both sides."""
    seeded(central, facade)
    change(central, 'p', add=('a',))
    sync(central, facade)
    if last == 'facade':
        change(central, 'p', remove=('a',))
    change(facade, 'p', remove=('a',))
    change(facade, 'p', add=('a',))
    if last == 'central':
        change(central, 'p', remove=('a',))
    sync(central, facade)
    expected = ['a'] if last == 'facade' else []
    assert tags_of(central) == tags_of(facade) == {'p': expected}
    sync(central, facade)  # and it stays settled
    assert tags_of(central) == tags_of(facade) == {'p': expected}


def test_a_link_message_again_late_or_twice_does_not_bring_back_a_removed_link(
        central, facade):
    seeded(central, facade)
    change(central, 'p', add=('a',))
    change(central, 'p', remove=('a',))
    [added, removed] = parse_messages(json.dumps(
        [{'id': 100 + i, 'body': json.dumps({'@link': fields}), 'format': 4}
         for i, fields in enumerate(_named(link_messages(central), 'central'))]))
    deliver(facade, removed, sender='central')  # out of order: the remove first
    apply(facade)
    deliver(facade, added, sender='central')
    apply(facade)
    assert tags_of(facade) == {'p': []}
    # The same add again under a new message id (a queue renumbered it).
    deliver(facade, *parse_messages(json.dumps(
        [{'id': 200, 'body': added.body, 'format': 4}])), sender='central')
    assert apply(facade).applied == 1
    assert tags_of(facade) == {'p': []}


def _named(fields: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Stored link bodies name their own app ``''``: as the wire names it."""
    for item in fields:
        for key, index in (('owner', 0), ('target', 0), ('stamp', 1)):
            if item[key][index] == '':
                item[key][index] = name
    return fields


@pytest.mark.parametrize('model', [LinkNote, LinkMemo], ids=['exclude', 'only'])
def test_an_excluded_relationship_does_not_travel(central, facade, model):
    create(central, LinkTag, name='a')
    with central.session() as session:
        tag = session.scalars(select(LinkTag)).one()
        session.add(model(title='n', tags=[tag]))
    sync(central, facade)
    assert tags_of(central, model) == {'n': ['a']}
    assert tags_of(facade, model) == {'n': []}
    assert link_messages(central) == []


def test_publish_by_hand_sends_what_changed_since_the_last_publish(central, facade):
    seeded(central, facade)
    with central.session() as session:
        tags = {tag.name: tag for tag in session.scalars(select(LinkTag))}
        draft = LinkDraft(title='d', tags=[tags['a'], tags['b']])
        session.add(draft)
        session.flush()
        publish(session, draft)
    sync(central, facade)
    assert tags_of(facade, LinkDraft) == {'d': ['a', 'b']}

    with central.session() as session:
        draft = session.scalars(select(LinkDraft)).one()
        draft.tags.remove(draft.tags[0])
        draft.tags.append(session.scalars(select(LinkTag).where(LinkTag.name == 'c')).one())
    sync(central, facade)
    assert tags_of(facade, LinkDraft) == {'d': ['a', 'b']}  # not published yet
    with central.session() as session:
        publish(session, session.scalars(select(LinkDraft)).one())
    sync(central, facade)
    assert tags_of(facade, LinkDraft) == tags_of(central, LinkDraft) == {'d': ['b', 'c']}


def test_a_link_to_a_record_not_here_yet_waits_and_applies_once_it_arrives(
        central, facade):
    seeded(central, facade)
    with facade.session() as session:  # a label the facade has not published
        post = session.scalars(select(LinkPost)).one()
        post.labels.append(LinkLabel(name='late'))
    sync(central, facade)
    assert tags_of(central, attribute='labels') == {'p': []}
    assert central.count('inbound_messages', 'failed_at IS NOT NULL') == 1

    with facade.session() as session:
        publish(session, session.scalars(select(LinkLabel)).one())
    sync(central, facade)
    apply(central)  # the failed link is retried after the label arrived
    assert tags_of(central, attribute='labels') == {'p': ['late']}
    assert central.count('inbound_messages', 'processed_at IS NULL') == 0


def published_topics(side: Side, *names: str) -> None:
    with side.session() as session:
        topics = [LinkTopic(name=name) for name in names]
        session.add_all(topics)
        session.flush()
        for topic in topics:
            publish(session, topic)


def retopic(side: Side, add: tuple[str, ...] = (), remove: tuple[str, ...] = ()) -> None:
    """Add and remove topics (by name) of the article 'intro'."""
    with side.session() as session:
        article = session.get(LinkArticle, 'intro')
        topics = {topic.name: topic for topic in session.scalars(select(LinkTopic))}
        for name in add:
            article.topics.append(topics[name])
        for name in remove:
            article.topics.remove(topics[name])


def test_links_between_keyed_records_travel_both_ways(central, facade):
    """A slug-keyed article's UUID-keyed topics (such links used to be
    refused as malformed: they named the record by its key, not its id)."""
    published_topics(central, 'x', 'y')
    with central.session() as session:
        session.add(LinkArticle(code='intro', title='intro'))
    retopic(central, add=('x', 'y'))
    sync(central, facade)
    assert tags_of(facade, LinkArticle, 'topics') == {'intro': ['x', 'y']}

    published_topics(facade, 'z')
    retopic(facade, add=('z',), remove=('x',))
    sync(central, facade)
    assert (tags_of(central, LinkArticle, 'topics') == tags_of(facade, LinkArticle, 'topics')
            == {'intro': ['y', 'z']})
    assert (sorted(central.rows('links_article_topics', 'topic_id'), key=str)
            == sorted(facade.rows('links_article_topics', 'topic_id'), key=str))


# -- a hostile peer ----------------------------------------------------------------

def forged(side: Side, *links: dict[str, Any], sender: str = 'facade') -> None:
    """Link messages a compromised peer writes, through the wire's checks."""
    deliver(side, *parse_messages(json.dumps(
        [{'id': 900 + i, 'body': json.dumps({'@link': fields}), 'format': 4}
         for i, fields in enumerate(links)])), sender=sender)


def link(owner: list, target: list, *, relationship: str = 'labels',
         stamp: list | None = None, linked: bool = True) -> dict[str, Any]:
    return {'record': 'links_post', 'relationship': relationship, 'owner': owner,
            'target': target, 'linked': linked, 'stamp': stamp or [now_hlc(), 'facade']}


def test_a_forged_link_to_a_private_record_of_central_is_refused(central, facade):
    seeded(central, facade)
    post_id = local(central, LinkPost, 'p')
    private = create(central, LinkLabel, name='private')  # never published
    private_post = create(central, LinkDraft, title='private')
    forged(central,
           link(['central', post_id], ['central', private]),
           {**link(['central', private_post], ['central', local(central, LinkTag, 'a')],
                   relationship='tags'), 'record': 'links_draft'},
           link(['central', post_id], ['central', local(central, LinkTag, 'a')],
                relationship='tags', stamp=[now_hlc(), 'central']),
           link(['central', post_id], ['central', local(central, LinkTag, 'a')],
                relationship='tags', stamp=[now_hlc() + 2 * 24 * 3600 * 10 ** 6, 'facade']))
    result = apply(central)
    assert result.failed == 4
    reasons = [row['last_error'] for row in central.rows('inbound_messages')
               if row['refused_at'] is not None]
    assert len(reasons) == 4
    assert 'links_label' in reasons[0] and 'never sent to it' in reasons[0]
    assert 'links_draft' in reasons[1] and 'never sent to it' in reasons[1]
    assert 'stamped by central' in reasons[2]
    assert 'more than a day ahead' in reasons[3]
    assert central.rows('links_post_labels', 'post_id') == []
    assert central.rows('links_post_tags', 'post_id') == []
    assert central.rows('links_draft_tags', 'draft_id') == []


def test_a_forged_link_to_a_private_keyed_record_is_refused(central, facade):
    with central.session() as session:
        session.add(LinkArticle(code='intro', title='intro'))
    sync(central, facade)
    with central.session() as session:
        private = LinkTopic(name='private')  # never published
        session.add(private)
        session.flush()
        private_handle = handle(receiver_of(private), private)
        article_handle = handle(receiver_of(session.get(LinkArticle, 'intro')),
                                session.get(LinkArticle, 'intro'))
    forged(central, {**link(['central', article_handle], ['central', private_handle],
                            relationship='topics'), 'record': 'links_article'})
    assert apply(central).failed == 1
    [row] = central.rows('inbound_messages', 'id')[-1:]
    assert row['refused_at'] is not None
    assert 'links_topic' in row['last_error'] and 'never sent to it' in row['last_error']
    assert central.rows('links_article_topics', 'article_code') == []


def test_links_of_a_publish_only_model_are_refused(central, facade):
    create(central, LinkPinned, title='pinned')
    create(central, LinkTag, name='a')
    sync(central, facade)
    forged(central, {**link(['central', local(central, LinkPinned, 'pinned')],
                            ['central', local(central, LinkTag, 'a')], relationship='tags'),
                     'record': 'links_pinned'})
    assert apply(central).failed == 1
    [row] = central.rows('inbound_messages', 'id')[-1:]
    assert row['refused_at'] is not None and 'does not accept updates' in row['last_error']
    assert tags_of(central, LinkPinned) == {'pinned': []}


def test_malformed_link_messages_are_refused_on_arrival(central):
    good = link(['facade', 1], ['facade', 2])
    messages = parse_messages(json.dumps([
        {'id': 1, 'body': json.dumps({'@link': good}), 'format': 3},
        {'id': 2, 'body': json.dumps({'@link': {**good, 'linked': 'yes'}}), 'format': 4},
        {'id': 3, 'body': json.dumps({'@link': {**good, 'extra': 1}}), 'format': 4},
        {'id': 4, 'body': json.dumps({'@link': good}), 'format': 4, 'origin': 'facade',
         'original_id': 1},
        {'id': 5, 'body': json.dumps({'@link': {**good, 'owner': ['facade', 'x']}}),
         'format': 4},
        {'id': 6, 'body': json.dumps({'@link': good}), 'format': 4},
    ]))
    assert [m.error is None for m in messages] == [False] * 5 + [True]
    assert 'format 4' in messages[0].error and '"linked"' in messages[1].error


def test_a_peer_without_links_keeps_link_messages_waiting(central, facade, monkeypatch):
    from pyramid_communicator import wire
    seeded(central, facade)
    change(central, 'p', add=('a',))
    forward(central, facade)
    monkeypatch.setattr(wire, 'FORMAT_VERSION', 3)  # the facade predates links
    result = apply(facade)
    assert (result.waiting_upgrade, result.failed) == (1, 0)
    monkeypatch.undo()  # and is upgraded
    apply(facade)
    assert tags_of(facade) == {'p': ['a']}


# -- randomized convergence -----------------------------------------------------------

class Exchange:
    """Carries queues as :func:`forward` does, keeping what crossed, so
    that old link messages can be sent again under new ids (a queue
    renumbered, a duplicate)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.sent: dict[str, list[WireMessage]] = {'central': [], 'facade': []}
        self.renumbered = 10 ** 6

    def carry(self, source: Side, target: Side) -> None:
        rows = [types.SimpleNamespace(**row) for row in source.rows('outbound_messages')
                if row['delivered_at'] is None]
        messages = [outbound_to_wire(row, source.name) for row in rows]
        self.sent[source.name] += [m for m in messages if m.body.startswith('{"@link"')]
        forward(source, target)

    def replay(self, source: Side, target: Side) -> None:
        old = self.sent[source.name]
        if old:
            self.renumbered += 1
            again = dataclasses.replace(self.rng.choice(old), id=self.renumbered)
            deliver(target, again, sender=source.name)


def random_changes(rng: random.Random, central: Side, facade: Side, steps: int) -> None:
    sides = {'central': central, 'facade': facade}
    exchange = Exchange(rng)
    for step in range(steps):
        name = rng.choice(list(sides))
        side, other = sides[name], sides['facade' if name == 'central' else 'central']
        roll = rng.random()
        if roll < 0.15:
            create(side, LinkTag, name=f'{name}{step}')
        elif roll < 0.6:
            with side.session() as session:
                post = rng.choice(session.scalars(select(LinkPost).order_by(LinkPost.id)).all())
                tags = session.scalars(select(LinkTag).order_by(LinkTag.id)).all()
                present = [tag for tag in tags if tag in post.tags]
                absent = [tag for tag in tags if tag not in post.tags]
                if present and (not absent or rng.random() < 0.4):
                    post.tags.remove(rng.choice(present))
                elif absent:
                    post.tags.append(rng.choice(absent))
        elif roll < 0.8:
            exchange.carry(side, other)
            if rng.random() < 0.5:
                apply(other)
        elif roll < 0.9:
            exchange.replay(side, other)
        else:
            apply(side)
    for _ in range(3):  # quiet exchanges: the links that waited for a record apply
        exchange.carry(central, facade)
        exchange.carry(facade, central)
        apply(central)
        apply(facade)


@pytest.mark.parametrize('seed', [20261207] + [  # one seed in the fast run
    pytest.param(seed, marks=pytest.mark.slow) for seed in range(20261208, 20261214)])
def test_random_membership_changes_on_both_sides_converge(central, facade, seed):
    """Random adds and removes on both sides, tags created on both, queues
    carried and applied at random moments, old link messages sent again;
    after quiet exchanges both sides hold the same links, nothing failed."""
    create(central, LinkPost, title='p1')
    create(central, LinkPost, title='p2')
    sync(central, facade)
    random_changes(random.Random(seed), central, facade, steps=60)
    assert tags_of(central) == tags_of(facade)
    for side in (central, facade):
        assert side.count('inbound_messages', 'processed_at IS NULL') == 0


def test_no_link_travels_to_a_gem_peer(central):
    """The gem knows records only: with ``communicator.gem_peer`` the
    records go and their links stay."""
    with testing.testConfig() as config:
        config.registry[REGISTRY_KEY] = parse_settings({
            'communicator.name': 'central', 'communicator.username': 'user',
            'communicator.password': 'secret', 'communicator.gem_peer': 'true'})
        with central.session() as session:
            session.add(LinkPost(title='p', tags=[LinkTag(name='a')]))
        with central.session() as session:
            draft = LinkDraft(title='d', tags=session.scalars(select(LinkTag)).all())
            session.add(draft)
            session.flush()
            publish(session, draft)
    assert link_messages(central) == []
    assert central.count('outbound_messages') == 3  # the post, the tag, the draft


# -- --verify and --repair compare and mend links ----------------------------------

DIFFERENT = 3


@dataclasses.dataclass
class Served:
    """Central's ``pcommunicate`` run in this process (where the models
    above are known) against the facade's app served on loopback."""
    central: Side
    facade: Side
    ini: Any
    capsys: Any

    def run(self, *args: str) -> tuple[int, dict[str, Any]]:
        from pyramid_communicator.scripts.pcommunicate import main
        self.capsys.readouterr()
        status = main(['pcommunicate', str(self.ini), *args, '--json'])
        out = self.capsys.readouterr().out
        return status, json.loads(out) if out.strip() else {}


@pytest.fixture
def served(central, facade, make_central, capsys) -> Iterator[Served]:
    from conftest import app_settings
    from fakes import serve_wsgi

    from pyramid_communicator.demo import main
    with serve_wsgi(main({}, **app_settings(facade))) as url:
        yield Served(central, facade, make_central(central, url).ini, capsys)


def hand_sql(side: Side, statement: str) -> None:
    from sqlalchemy import text
    with side.engine.begin() as connection:
        connection.execute(text(statement))


def tagged(central: Side, facade: Side) -> None:
    """Post p tagged a and b on central, c on the facade, all synced."""
    seeded(central, facade)
    change(central, 'p', add=('a', 'b'))
    change(facade, 'p', add=('c',))
    sync(central, facade)
    assert tags_of(central) == tags_of(facade) == {'p': ['a', 'b', 'c']}


def identity(side: Side, cls: type, title_or_name: str, origin: str = 'central') -> list:
    """The identity both sides name a record of ``origin`` by."""
    local_id = local(side, cls, title_or_name)
    if side.name == origin:
        return [origin, local_id]
    [row] = [row for row in side.rows('communicator_mappings')
             if row['local_id'] == local_id and row['origin'] == origin
             and row['name'] == receiver_name(cls)]
    return [origin, row['original_id']]


def receiver_name(cls: type) -> str:
    return {LinkPost: 'links_post', LinkTag: 'links_tag', LinkLabel: 'links_label'}[cls]


def test_verify_is_clean_once_links_have_synced(served):
    tagged(served.central, served.facade)
    status, report = served.run('--verify', 'links_post')
    assert status == 0 and report['equal'], report
    assert report['names'] == ['links_post']


@pytest.mark.slow
@pytest.mark.parametrize('where', ['central', 'facade'])
@pytest.mark.parametrize('how', ['insert', 'delete'])
def test_a_link_changed_by_hand_is_found_and_repaired(served, where, how):
    """SQL run by hand on one side's association table: --verify names the
    relationship and both sides' members; --repair (this app preferred:
    the stamps of the link are the same on both sides) makes the facade
    hold central's membership, through link messages; verify is clean."""
    central, facade = served.central, served.facade
    tagged(central, facade)
    create(central, LinkTag, name='d')
    sync(central, facade)
    side = central if where == 'central' else facade
    post, tag = local(side, LinkPost, 'p'), local(side, LinkTag, 'd' if how == 'insert' else 'a')
    if how == 'insert':
        hand_sql(side, f'INSERT INTO links_post_tags (post_id, tag_id) VALUES ({post}, {tag})')
    else:
        hand_sql(side, f'DELETE FROM links_post_tags WHERE post_id = {post} AND tag_id = {tag}')
    before = tags_of(central)

    status, report = served.run('--verify', 'links_post')
    assert status == DIFFERENT
    [difference] = report['differences']
    assert difference['name'] == 'links_post'
    assert difference['identity'] == identity(central, LinkPost, 'p')
    members = {name: identity(central, LinkTag, name) for name in 'abcd'}
    ours = sorted(members[name] for name in tags_of(central)['p'])
    theirs = sorted(members[name] for name in tags_of(facade)['p'])
    assert difference['links'] == {'tags': {'central': ours, 'facade': theirs}}
    assert difference['central']['tags'] == ours and difference['facade']['tags'] == theirs

    status, repaired = served.run('--repair', 'links_post')
    assert status == 0 and repaired['equal'], repaired
    assert repaired['repair']['relinked_here'] + repaired['repair']['relinked_by_peer'] == 1
    assert tags_of(central) == tags_of(facade) == before
    status, report = served.run('--verify', 'links_post')
    assert status == 0 and report['equal'], report


@pytest.mark.slow
def test_prefer_the_facade_takes_its_membership(served):
    central, facade = served.central, served.facade
    tagged(central, facade)
    post, tag = local(facade, LinkPost, 'p'), local(facade, LinkTag, 'a')
    hand_sql(facade, f'DELETE FROM links_post_tags WHERE post_id = {post} AND tag_id = {tag}')
    status, repaired = served.run('--repair', 'links_post', '--prefer', 'facade')
    assert status == 0 and repaired['equal'], repaired
    assert repaired['repair']['relinked_by_peer'] == 1
    assert tags_of(central) == tags_of(facade) == {'p': ['b', 'c']}


@pytest.mark.slow
def test_the_later_change_of_a_link_wins_over_prefer(served):
    """A link removed on the facade through the ORM (stamped later than the
    add both sides kept) whose message never left: --repair takes the
    facade's membership though central is preferred."""
    central, facade = served.central, served.facade
    tagged(central, facade)
    change(facade, 'p', remove=('b',))
    hand_sql(facade, 'DELETE FROM outbound_messages WHERE delivered_at IS NULL')
    status, repaired = served.run('--repair', 'links_post')
    assert status == 0 and repaired['equal'], repaired
    assert tags_of(central) == tags_of(facade) == {'p': ['a', 'c']}


@pytest.mark.slow
def test_repair_never_links_a_record_that_was_not_shared(served):
    """Central links its post to a label it never published, by hand: verify
    reports it, repair leaves it (no identity names the label, so no message
    can), and the facade links nothing."""
    central, facade = served.central, served.facade
    tagged(central, facade)
    private = create(central, LinkLabel, name='private')
    post = local(central, LinkPost, 'p')
    hand_sql(central, f'INSERT INTO links_post_labels (post_id, label_id) '
                      f'VALUES ({post}, {private})')
    status, report = served.run('--verify', 'links_post')
    assert status == DIFFERENT
    [difference] = report['differences']
    assert difference['links'] == {'labels': {'central': [['unshared']], 'facade': []}}

    status, repaired = served.run('--repair', 'links_post')
    assert status == DIFFERENT
    [left] = repaired['repair']['left_as_is']
    assert 'never shared' in left['reason'] and left['reason'].startswith('labels')
    assert repaired['repair']['relinked_here'] == repaired['repair']['relinked_by_peer'] == 0
    assert facade.rows('links_post_labels', 'post_id') == []
    assert facade.count('links_labels') == 0
    assert tags_of(facade, attribute='labels') == {'p': []}


@pytest.mark.slow
def test_a_record_re_created_by_repair_brings_its_links(served):
    central, facade = served.central, served.facade
    tagged(central, facade)
    post = local(facade, LinkPost, 'p')
    hand_sql(facade, f'DELETE FROM links_post_tags WHERE post_id = {post}')
    hand_sql(facade, f'DELETE FROM links_posts WHERE id = {post}')
    status, report = served.run('--verify', 'links_post')
    assert status == DIFFERENT and report['differences'][0]['facade'] == 'missing'
    status, repaired = served.run('--repair', 'links_post')
    assert status == 0 and repaired['equal'], repaired
    assert tags_of(facade) == tags_of(central) == {'p': ['a', 'b', 'c']}
