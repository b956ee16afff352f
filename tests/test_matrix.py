"""The model-shape matrix: every shape of synced model, on every pair of
backends, in both directions, through a real sync.

A *shape* is one kind of thing an app syncs (a model with scalar columns,
models linked by foreign keys, a natural key, deletes, plain messages...).
For each shape × pair × direction, two apps are made: a facade served on
127.0.0.1 (the add-on's views, in a thread) and a central app whose
``Communicator`` pushes, pulls and applies over HTTP, as ``pcommunicate``
does.  The sending side writes the shape's records in *rounds*, each
followed by a sync; then the receiving side must hold the shape's expected
state, and neither side may have anything failed, refused or undelivered.

Pairs are ``central/facade`` backends.  The default run takes the pair
of the run's backend (``--db``) with itself; the mixed pairs
(``postgresql/sqlite``, ``mysql/postgresql``) are ``slow`` and run with
``--db postgresql`` only, so that CI, which runs the slow tests once per
backend, runs them once.  ``--matrix-all`` runs every pair whatever
``--db`` says (a pair whose server is not reachable is skipped);
``benchmarks/matrix_report.py`` does that and prints the table.

Adding a shape is one entry in :data:`SHAPES`::

    Shape(
        'uuid keys',                  # its name in test ids and the table
        bases=(UuidBase,),            # test-local DeclarativeBases: their
                                      # tables are made on both sides
        rounds=(create, edit),        # write(session, ctx) on the sender;
                                      # a sync follows each
        state=uuid_state,             # state(session): what a side holds,
                                      # in terms free of its local ids
        expected=lambda ctx: {...},   # the receiver's state after the rounds
    )

``ctx`` (:class:`Context`) says who sends and on which backends, for
values a backend cannot keep (see test_types' ``sample``).  A shape may
also write on the receiver before the first round (``prepare``) or
between a round's write and its sync (``meanwhile``), register
plain-message handlers on both apps (``handlers``) and skip the cases it
cannot run (``skip=lambda ctx: reason or None``, e.g. a PostgreSQL-only
type).  Models go on a DeclarativeBase of the shape's own, with
``receives_from`` names no other test uses.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import SERVER_URLS, Side, app_settings
from convergence import queue_problems
from fakes import serve_wsgi
from pyramid.config import Configurator
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
    create_engine,
    select,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from test_types import TypesBase, TypesSample, sample
from test_types import expected as types_expected

from pyramid_communicator import publish, receives_from, send
from pyramid_communicator.messages import SETTINGS_INFO, Message
from pyramid_communicator.models import NAMING_CONVENTION
from pyramid_communicator.records import receiver_of
from pyramid_communicator.settings import get_settings
from pyramid_communicator.sync import Communicator

CENTRAL, FACADE = 'central', 'facade'


@dataclasses.dataclass(frozen=True)
class Context:
    """Who sends in this case, and the backends of both sides."""
    sender: str
    central_db: str
    facade_db: str

    @property
    def receiver(self) -> str:
        return FACADE if self.sender == CENTRAL else CENTRAL

    @property
    def sender_db(self) -> str:
        return self.central_db if self.sender == CENTRAL else self.facade_db

    @property
    def backends(self) -> tuple[str, str]:
        return self.central_db, self.facade_db


Write = Callable[[Session, Context], None]


@dataclasses.dataclass(frozen=True)
class Shape:
    """One row of the matrix (see the module docstring)."""
    name: str
    bases: tuple[type[DeclarativeBase], ...]
    rounds: tuple[Write, ...]
    state: Callable[[Session], Any]
    expected: Callable[[Context], Any]
    #: Written on the receiver before the first round (and synced with it).
    prepare: Write | None = None
    #: ``(kind, handler)`` of plain messages, registered on both apps.
    handlers: tuple[tuple[str, Callable[[Message], Any]], ...] = ()
    #: Why a case cannot run (e.g. a PostgreSQL-only type on another
    #: backend): a reason skips it, None runs it.
    skip: Callable[[Context], str | None] | None = None
    #: ``(round index, write)``: written on the receiver after that round's
    #: write on the sender and before its sync, so both sides' changes
    #: meet in one sync.
    meanwhile: tuple[tuple[int, Write], ...] = ()


# -- shape: scalar columns of every common type (test_types' sample) ------------------

def types_values(ctx: Context) -> dict[str, Any]:
    """test_types' sample as the sender's backend keeps it (a short text:
    test_types sends its megabyte)."""
    return {**sample(interval_micro='mysql' not in ctx.backends,
                     zones=ctx.sender_db == 'postgresql'),
            'text': 'ünïcødé 🙂 中文 \t\n"\\' * 100}


def types_create(session: Session, ctx: Context) -> None:
    record = TypesSample(**types_values(ctx))
    session.add(record)
    session.flush()
    publish(session, record)


def types_edit(session: Session, ctx: Context) -> None:
    [record] = session.scalars(select(TypesSample)).all()
    record.flag = True
    publish(session, record)


def typed(values: dict[str, Any]) -> dict[str, tuple[str, Any]]:
    return {key: (type(value).__name__, value) for key, value in values.items()}


def types_state(session: Session) -> list[dict[str, tuple[str, Any]]]:
    """Each record's values as the add-on compares them (aware datetimes
    in UTC), with their Python types."""
    return [typed({key: receiver_of(record).canonical(key, getattr(record, key))
                   for key in TypesSample.__mapper__.columns.keys() if key != 'id'})
            for record in session.scalars(select(TypesSample))]


def types_wanted(ctx: Context) -> list[dict[str, tuple[str, Any]]]:
    return [typed(types_expected({**types_values(ctx), 'flag': True}))]


# -- shape: foreign keys between synced models -----------------------------------------

class LinksBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_parent')
class MatrixParent(LinksBase):
    """Published by hand: one left unpublished takes the sender's first id."""
    __tablename__ = 'matrix_parents'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(50))


@receives_from('matrix_child', autopublish=True)
class MatrixChild(LinksBase):
    __tablename__ = 'matrix_children'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey('matrix_parents.id'))
    body: Mapped[str] = mapped_column(String(50))


def links_create(session: Session, ctx: Context) -> None:
    session.add(MatrixParent(title='never sent'))  # so ids differ between the sides
    first, second = MatrixParent(title='first'), MatrixParent(title='second')
    session.add_all([first, second])
    session.flush()
    publish(session, first)
    publish(session, second)
    session.add_all([MatrixChild(parent_id=second.id, body='on second'),
                     MatrixChild(parent_id=first.id, body='moves'),
                     MatrixChild(parent_id=None, body='orphan')])


def links_edit(session: Session, ctx: Context) -> None:
    first = session.scalars(select(MatrixParent).filter_by(title='first')).one()
    second = session.scalars(select(MatrixParent).filter_by(title='second')).one()
    session.scalars(select(MatrixChild).filter_by(body='moves')).one().parent_id = second.id
    session.scalars(select(MatrixChild).filter_by(body='orphan')).one().parent_id = first.id


def links_state(session: Session) -> dict[str, Any]:
    """Children by body, each naming its parent by title (ids differ)."""
    titles = {parent.id: parent.title for parent in session.scalars(select(MatrixParent))}
    return {'parents': sorted(titles.values()),
            'children': {child.body: titles.get(child.parent_id)
                         for child in session.scalars(select(MatrixChild))}}


# -- shape: match_on natural keys ------------------------------------------------------

class NaturalBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_label', autopublish=True, match_on=['code'])
class MatrixLabel(NaturalBase):
    __tablename__ = 'matrix_labels'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    code: Mapped[str] = mapped_column(String(20), unique=True)
    text: Mapped[str | None] = mapped_column(String(50))


def natural_prepare(session: Session, ctx: Context) -> None:
    """The receiver made 'shared' itself, before any sync."""
    session.add(MatrixLabel(code='shared', text=f'by {ctx.receiver}'))


def natural_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixLabel(code='shared', text=f'by {ctx.sender}'),
                     MatrixLabel(code='own', text='one')])


def natural_edit(session: Session, ctx: Context) -> None:
    for label in session.scalars(select(MatrixLabel)):
        label.text = f'{label.code} edited'


def natural_state(session: Session) -> list[tuple[str, str | None]]:
    return sorted((label.code, label.text) for label in session.scalars(select(MatrixLabel)))


# -- shape: deletes and their tombstones -----------------------------------------------

class DeletesBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_note', autopublish=True, deletes=True)
class MatrixNote(DeletesBase):
    __tablename__ = 'matrix_notes'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(20))
    body: Mapped[str | None] = mapped_column(String(50))


def notes_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixNote(title=title, body='new') for title in ('a', 'b', 'c', 'd')])


def notes_edit_and_delete(session: Session, ctx: Context) -> None:
    notes = {note.title: note for note in session.scalars(select(MatrixNote))}
    session.delete(notes['b'])
    notes['c'].body = 'edited'


def notes_delete_created(session: Session, ctx: Context) -> None:
    """A record created and deleted between two syncs; a delete of the last."""
    fleeting = MatrixNote(title='e', body='fleeting')
    session.add(fleeting)
    session.flush()
    session.delete(fleeting)
    session.delete(session.scalars(select(MatrixNote).filter_by(title='d')).one())


def notes_state(session: Session) -> list[tuple[str, str | None]]:
    return sorted((note.title, note.body) for note in session.scalars(select(MatrixNote)))


# -- shape: plain messages -------------------------------------------------------------

class MessagesBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class MatrixReceived(MessagesBase):
    """What the handler of ``matrix.note`` keeps (not a synced model)."""
    __tablename__ = 'matrix_received'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    origin: Mapped[str] = mapped_column(String(20))
    text: Mapped[str] = mapped_column(String(50))


def note_received(message: Message) -> None:
    message.session.add(MatrixReceived(origin=message.origin, text=message.payload['text']))


def messages_first(session: Session, ctx: Context) -> None:
    send(session, 'matrix.note', {'text': 'one'})
    send(session, 'matrix.note', {'text': 'two'}, key='k')


def messages_second(session: Session, ctx: Context) -> None:
    send(session, 'matrix.note', {'text': 'three'}, key='k')


def messages_state(session: Session) -> list[tuple[str, str]]:
    return [(row.origin, row.text)
            for row in session.scalars(select(MatrixReceived).order_by(MatrixReceived.id))]


# -- shape: a polymorphic hierarchy (single-table and joined-table) --------------------

class HierarchyBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_media', autopublish=True, deletes=True)
class MatrixMedia(HierarchyBase):
    __tablename__ = 'matrix_media'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {'polymorphic_on': 'kind', 'polymorphic_identity': 'media'}


class MatrixBook(MatrixMedia):
    """Single-table: its column is on matrix_media."""
    pages: Mapped[int | None] = mapped_column(Integer, nullable=True)
    __mapper_args__ = {'polymorphic_identity': 'book'}


class MatrixFilm(MatrixMedia):
    """Joined-table: a table of its own."""
    __tablename__ = 'matrix_films'
    id: Mapped[int] = mapped_column(ForeignKey('matrix_media.id'), primary_key=True)
    minutes: Mapped[int | None] = mapped_column(Integer)
    __mapper_args__ = {'polymorphic_identity': 'film'}


def hierarchy_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixMedia(title='plain'), MatrixBook(title='Dune', pages=412),
                     MatrixFilm(title='Heat', minutes=170), MatrixFilm(title='Gone')])


def hierarchy_edit_and_delete(session: Session, ctx: Context) -> None:
    session.scalars(select(MatrixBook)).one().pages = 500
    session.scalars(select(MatrixFilm).filter_by(title='Heat')).one().minutes = 171
    session.delete(session.scalars(select(MatrixFilm).filter_by(title='Gone')).one())


def hierarchy_state(session: Session) -> list[tuple[str, str, int | None]]:
    return sorted((type(record).__name__, record.title,
                   getattr(record, 'pages', None) or getattr(record, 'minutes', None))
                  for record in session.scalars(select(MatrixMedia)))


# -- shape: a tree and a cycle, children first -----------------------------------------

class TreesBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_node')
class MatrixNode(TreesBase):
    __tablename__ = 'matrix_nodes'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey('matrix_nodes.id'))


@receives_from('matrix_team')
class MatrixTeam(TreesBase):
    __tablename__ = 'matrix_teams'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    captain_id: Mapped[int | None] = mapped_column(
        ForeignKey('matrix_players.id', use_alter=True))


@receives_from('matrix_player')
class MatrixPlayer(TreesBase):
    __tablename__ = 'matrix_players'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    team_id: Mapped[int | None] = mapped_column(ForeignKey('matrix_teams.id'))


def trees_create(session: Session, ctx: Context) -> None:
    """Three levels, published leaves first; a team and its captain
    pointing at each other, one message each."""
    nodes = []
    for name, parent in [('root', None), ('a', 0), ('b', 0), ('a1', 1), ('a2', 1), ('b1', 2)]:
        node = MatrixNode(name=name, parent_id=None if parent is None else nodes[parent].id)
        session.add(node)
        session.flush()
        nodes.append(node)
    team, player = MatrixTeam(name='team'), MatrixPlayer(name='captain')
    session.add_all([team, player])
    session.flush()
    team.captain_id, player.team_id = player.id, team.id
    session.flush()
    for record in [*reversed(nodes), player, team]:
        publish(session, record)


def trees_state(session: Session) -> dict[str, Any]:
    nodes = {node.id: node for node in session.scalars(select(MatrixNode))}
    players = {player.id: player for player in session.scalars(select(MatrixPlayer))}
    teams = {team.id: team for team in session.scalars(select(MatrixTeam))}
    return {'nodes': {node.name: nodes[node.parent_id].name if node.parent_id else None
                      for node in nodes.values()},
            'captains': {team.name: (players[team.captain_id].name,
                                     teams[players[team.captain_id].team_id].name)
                         for team in teams.values()}}


# -- shape: a UUID primary key ---------------------------------------------------------

class UuidBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_memo', autopublish=True, deletes=True)
class MatrixMemo(UuidBase):
    """The same UUID on both sides: the key is the record's identity."""
    __tablename__ = 'matrix_memos'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str] = mapped_column(String(50))


MEMO_KEPT, MEMO_GONE, MEMO_THEIRS = (
    uuid.UUID('6f1c1c3e-0000-4000-8000-00000000000a'),
    uuid.UUID('6f1c1c3e-0000-4000-8000-00000000000b'),
    uuid.UUID('6f1c1c3e-0000-4000-8000-00000000000c'))


def memos_prepare(session: Session, ctx: Context) -> None:
    """The receiver's own memo, under another UUID, before any sync."""
    session.add(MatrixMemo(id=MEMO_THEIRS, title=f'by {ctx.receiver}'))


def memos_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixMemo(id=MEMO_KEPT, title='kept'),
                     MatrixMemo(id=MEMO_GONE, title='gone')])


def memos_edit_and_delete(session: Session, ctx: Context) -> None:
    session.get(MatrixMemo, MEMO_KEPT).title = 'kept, edited'
    session.delete(session.get(MatrixMemo, MEMO_GONE))


def memos_create_again(session: Session, ctx: Context) -> None:
    """The deleted UUID again, once its delete was delivered."""
    session.add(MatrixMemo(id=MEMO_GONE, title='back'))


def memos_state(session: Session) -> list[tuple[uuid.UUID, str]]:
    """By UUID: the key is the same on every side (not a local id)."""
    return sorted((memo.id, memo.title) for memo in session.scalars(select(MatrixMemo)))


# -- shape: a string primary key (a code) ----------------------------------------------

class CodeBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_currency', autopublish=True, deletes=True)
class MatrixCurrency(CodeBase):
    __tablename__ = 'matrix_currencies'
    code: Mapped[str] = mapped_column(String(3), primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


@receives_from('matrix_price', autopublish=True, deletes=True)
class MatrixPrice(CodeBase):
    """A foreign key to a keyed model: the code, the same on every side."""
    __tablename__ = 'matrix_prices'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    currency_code: Mapped[str] = mapped_column(ForeignKey('matrix_currencies.code'))
    amount: Mapped[int] = mapped_column(Integer)


def currencies_prepare(session: Session, ctx: Context) -> None:
    """The receiver made EUR too (one record once they meet) and a code
    of its own, before any sync."""
    session.add_all([MatrixCurrency(code='EUR', name=f'by {ctx.receiver}'),
                     MatrixCurrency(code='CHF', name='Swiss franc')])


def currencies_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixCurrency(code='EUR', name='Euro'),
                     MatrixCurrency(code='USD', name='US dollar'),
                     MatrixCurrency(code='GBP', name='Pound sterling')])
    session.flush()
    session.add_all([MatrixPrice(currency_code='EUR', amount=10),
                     MatrixPrice(currency_code='GBP', amount=20)])


def currencies_edit_and_delete(session: Session, ctx: Context) -> None:
    session.get(MatrixCurrency, 'EUR').name = 'Euro (€)'
    price = session.scalars(select(MatrixPrice).filter_by(currency_code='GBP')).one()
    price.currency_code = 'USD'
    session.flush()
    session.delete(session.get(MatrixCurrency, 'GBP'))


def currencies_create_again(session: Session, ctx: Context) -> None:
    """A code deleted (and its delete delivered) comes back."""
    session.add(MatrixCurrency(code='GBP', name='Pound, again'))


def currencies_state(session: Session) -> dict[str, list[tuple[str, Any]]]:
    return {'currencies': sorted((row.code, row.name)
                                 for row in session.scalars(select(MatrixCurrency))),
            'prices': sorted((row.currency_code, row.amount)
                             for row in session.scalars(select(MatrixPrice)))}


# -- shape: a composite key, one part a foreign key to a synced model ------------------

class CompositeBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_order')
class MatrixOrder(CompositeBase):
    """Published by hand: one left unpublished takes the sender's first id."""
    __tablename__ = 'matrix_orders'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))


@receives_from('matrix_order_line', autopublish=True, deletes=True)
class MatrixOrderLine(CompositeBase):
    """(our copy of the order, the same sku): an association object's shape."""
    __tablename__ = 'matrix_order_lines'
    order_id: Mapped[int] = mapped_column(ForeignKey('matrix_orders.id'), primary_key=True)
    sku: Mapped[str] = mapped_column(String(20), primary_key=True)
    quantity: Mapped[int] = mapped_column(Integer)


def orders_create(session: Session, ctx: Context) -> None:
    session.add(MatrixOrder(name='never sent'))  # so ids differ between the sides
    first, second = MatrixOrder(name='first'), MatrixOrder(name='second')
    session.add_all([first, second])
    session.flush()
    publish(session, first)
    publish(session, second)
    session.add_all([MatrixOrderLine(order_id=first.id, sku='apple', quantity=1),
                     MatrixOrderLine(order_id=first.id, sku='pear', quantity=2),
                     MatrixOrderLine(order_id=first.id, sku='crème "brûlée" 🙂', quantity=4),
                     MatrixOrderLine(order_id=second.id, sku='apple', quantity=5)])


def orders_edit_and_delete(session: Session, ctx: Context) -> None:
    first = session.scalars(select(MatrixOrder).filter_by(name='first')).one()
    session.get(MatrixOrderLine, (first.id, 'apple')).quantity = 3
    session.delete(session.get(MatrixOrderLine, (first.id, 'pear')))


def orders_state(session: Session) -> list[tuple[str | None, str, int]]:
    """Lines naming their order by name (its id differs per side)."""
    names = {order.id: order.name for order in session.scalars(select(MatrixOrder))}
    return sorted((names.get(line.order_id), line.sku, line.quantity)
                  for line in session.scalars(select(MatrixOrderLine)))


# -- shape: many-to-many links between synced models -----------------------------------

class ManyBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


matrix_post_tags = Table(
    'matrix_post_tags', ManyBase.metadata,
    Column('post_id', ForeignKey('matrix_posts.id'), primary_key=True),
    Column('tag_id', ForeignKey('matrix_tags.id'), primary_key=True))

matrix_post_topics = Table(
    'matrix_post_topics', ManyBase.metadata,
    Column('post_id', ForeignKey('matrix_posts.id'), primary_key=True),
    Column('topic_code', ForeignKey('matrix_topics.code'), primary_key=True))


@receives_from('matrix_topic', autopublish=True)
class MatrixTopic(ManyBase):
    """Keyed by its code: links to it name the code, the same everywhere."""
    __tablename__ = 'matrix_topics'
    code: Mapped[str] = mapped_column(String(20), primary_key=True)


@receives_from('matrix_tag', autopublish=True)
class MatrixTag(ManyBase):
    __tablename__ = 'matrix_tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(20))
    posts: Mapped[list[MatrixPost]] = relationship(secondary=matrix_post_tags,
                                                   back_populates='tags')


@receives_from('matrix_post', autopublish=True)
class MatrixPost(ManyBase):
    __tablename__ = 'matrix_posts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(20))
    tags: Mapped[list[MatrixTag]] = relationship(secondary=matrix_post_tags,
                                                 back_populates='posts')
    topics: Mapped[list[MatrixTopic]] = relationship(secondary=matrix_post_topics)


def named(session: Session, cls: type, **where: Any) -> Any:
    return session.scalars(select(cls).filter_by(**where)).one()


def posts_prepare(session: Session, ctx: Context) -> None:
    """The receiver's own tag (so tag ids differ between the sides)."""
    session.add(MatrixTag(name=f'by {ctx.receiver}'))


def posts_create(session: Session, ctx: Context) -> None:
    tags = [MatrixTag(name=name) for name in ('python', 'old', 'web', 'new')]
    topics = [MatrixTopic(code=code) for code in ('web', 'db', 'ünï')]
    session.add_all([MatrixPost(title='post', tags=tags[:3], topics=topics[:2]),
                     MatrixPost(title='empty'), *tags[3:], topics[2]])


def posts_change(session: Session, ctx: Context) -> None:
    post = named(session, MatrixPost, title='post')
    post.tags.remove(named(session, MatrixTag, name='old'))
    post.tags.append(named(session, MatrixTag, name='new'))
    web, empty = named(session, MatrixTag, name='web'), named(session, MatrixPost, title='empty')
    web.posts.append(empty)  # the other direction of the pair
    post.topics.remove(session.get(MatrixTopic, 'db'))
    post.topics.append(session.get(MatrixTopic, 'ünï'))


def posts_meanwhile(session: Session, ctx: Context) -> None:
    """The receiver links its own tag to the post, before the sync that
    brings the sender's changes: a membership change of its own."""
    post = named(session, MatrixPost, title='post')
    post.tags.append(named(session, MatrixTag, name=f'by {ctx.receiver}'))


def posts_state(session: Session) -> dict[str, tuple[list[str], list[str]]]:
    """Each post's tags and topics."""
    return {post.title: (sorted(tag.name for tag in post.tags),
                         sorted(topic.code for topic in post.topics))
            for post in session.scalars(select(MatrixPost))}


# -- shape: an integer key the app chooses ---------------------------------------------

class ChosenBase(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


@receives_from('matrix_ticket', autopublish=True, deletes=True)
class MatrixTicket(ChosenBase):
    __tablename__ = 'matrix_tickets'
    number: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    subject: Mapped[str] = mapped_column(String(50))


def tickets_prepare(session: Session, ctx: Context) -> None:
    session.add(MatrixTicket(number=500, subject=f'by {ctx.receiver}'))


def tickets_create(session: Session, ctx: Context) -> None:
    session.add_all([MatrixTicket(number=number, subject=f'#{number}')
                     for number in (7, 101, 0, -3, 2**62 + 1)])


def tickets_edit_and_delete(session: Session, ctx: Context) -> None:
    session.get(MatrixTicket, 7).subject = '#7 edited'
    session.delete(session.get(MatrixTicket, 101))


def tickets_state(session: Session) -> list[tuple[int, str]]:
    return sorted((row.number, row.subject) for row in session.scalars(select(MatrixTicket)))


# -- the shapes ------------------------------------------------------------------------

SHAPES: list[Shape] = [
    Shape('scalar_types', bases=(TypesBase,), rounds=(types_create, types_edit),
          state=types_state, expected=types_wanted),
    Shape('foreign_keys', bases=(LinksBase,), rounds=(links_create, links_edit),
          state=links_state,
          expected=lambda ctx: {'parents': ['first', 'second'],
                                'children': {'on second': 'second', 'moves': 'second',
                                             'orphan': 'first'}}),
    Shape('match_on', bases=(NaturalBase,), rounds=(natural_create, natural_edit),
          prepare=natural_prepare, state=natural_state,
          expected=lambda ctx: [('own', 'own edited'), ('shared', 'shared edited')]),
    Shape('deletes', bases=(DeletesBase,),
          rounds=(notes_create, notes_edit_and_delete, notes_delete_created),
          state=notes_state, expected=lambda ctx: [('a', 'new'), ('c', 'edited')]),
    Shape('plain_messages', bases=(MessagesBase,), rounds=(messages_first, messages_second),
          handlers=(('matrix.note', note_received),), state=messages_state,
          expected=lambda ctx: [(ctx.sender, text) for text in ('one', 'two', 'three')]),
    Shape('inheritance', bases=(HierarchyBase,),
          rounds=(hierarchy_create, hierarchy_edit_and_delete), state=hierarchy_state,
          expected=lambda ctx: [('MatrixBook', 'Dune', 500), ('MatrixFilm', 'Heat', 171),
                                ('MatrixMedia', 'plain', None)]),
    Shape('trees_and_cycles', bases=(TreesBase,), rounds=(trees_create,), state=trees_state,
          expected=lambda ctx: {'nodes': {'root': None, 'a': 'root', 'b': 'root', 'a1': 'a',
                                          'a2': 'a', 'b1': 'b'},
                                'captains': {'team': ('captain', 'team')}}),
    Shape('uuid_keys', bases=(UuidBase,),
          rounds=(memos_create, memos_edit_and_delete, memos_create_again),
          prepare=memos_prepare, state=memos_state,
          expected=lambda ctx: [(MEMO_KEPT, 'kept, edited'), (MEMO_GONE, 'back'),
                                (MEMO_THEIRS, f'by {ctx.receiver}')]),
    Shape('string_keys', bases=(CodeBase,),
          rounds=(currencies_create, currencies_edit_and_delete, currencies_create_again),
          prepare=currencies_prepare, state=currencies_state,
          expected=lambda ctx: {'currencies': [('CHF', 'Swiss franc'), ('EUR', 'Euro (€)'),
                                               ('GBP', 'Pound, again'), ('USD', 'US dollar')],
                                'prices': [('EUR', 10), ('USD', 20)]}),
    Shape('composite_keys', bases=(CompositeBase,),
          rounds=(orders_create, orders_edit_and_delete), state=orders_state,
          expected=lambda ctx: [('first', 'apple', 3), ('first', 'crème "brûlée" 🙂', 4),
                                ('second', 'apple', 5)]),
    Shape('many_to_many', bases=(ManyBase,), rounds=(posts_create, posts_change),
          prepare=posts_prepare, meanwhile=((1, posts_meanwhile),), state=posts_state,
          expected=lambda ctx: {
              'post': (sorted([f'by {ctx.receiver}', 'new', 'python', 'web']), ['web', 'ünï']),
              'empty': (['web'], [])}),
    Shape('app_chosen_int_keys', bases=(ChosenBase,),
          rounds=(tickets_create, tickets_edit_and_delete), prepare=tickets_prepare,
          state=tickets_state,
          expected=lambda ctx: [(-3, '#-3'), (0, '#0'), (7, '#7 edited'),
                                (500, f'by {ctx.receiver}'), (2**62 + 1, f'#{2**62 + 1}')]),
]

#: ``(central backend, facade backend)``: the same-backend pairs, then the mixed.
PAIRS: list[tuple[str, str]] = [
    ('sqlite', 'sqlite'), ('postgresql', 'postgresql'), ('mysql', 'mysql'),
    ('postgresql', 'sqlite'), ('mysql', 'postgresql'),
]
DIRECTIONS = {'central>facade': CENTRAL, 'facade>central': FACADE}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """The pairs this run takes (see the module docstring): the rest are
    not collected at all, rather than skipped in every run."""
    if 'central_db' not in metafunc.fixturenames:
        return
    config = metafunc.config
    run_db, every = config.getoption('--db'), config.getoption('--matrix-all')
    params = []
    for central_db, facade_db in PAIRS:
        mixed = central_db != facade_db
        if every or (run_db == 'postgresql' if mixed else run_db == central_db):
            params.append(pytest.param(central_db, facade_db,
                                       marks=[pytest.mark.slow] if mixed else [],
                                       id=f'{central_db}/{facade_db}'))
    metafunc.parametrize('central_db, facade_db', params)


# -- running a case --------------------------------------------------------------------

@functools.cache
def unreachable(backend: str) -> str | None:
    """Why the backend's server cannot be used (None: it can)."""
    if backend == 'sqlite':
        return None
    engine = create_engine(SERVER_URLS[backend])
    try:
        with engine.connect() as conn:
            conn.execute(text('SELECT 1'))
    except Exception as exc:  # any failure to connect: the pair is skipped
        return f'{backend} not reachable: {str(exc).splitlines()[0]}'
    finally:
        engine.dispose()
    return None


def skip_unreachable(*backends: str) -> None:
    for backend in sorted(set(backends)):
        reason = unreachable(backend)
        if reason:
            pytest.skip(reason)


def make_app(side: Side, shape: Shape, **overrides: Any) -> Any:
    """A host app as the cookiecutter wires one (the demo's models
    module: ``request.dbsession`` joined to ``request.tm``), with the
    add-on and the shape's message handlers."""
    with Configurator(settings=app_settings(side, **overrides)) as config:
        config.include('pyramid_communicator.demo.models')
        config.include('pyramid_communicator')
        for kind, handler in shape.handlers:
            config.add_message_handler(kind, handler, accept_from=[CENTRAL, FACADE])
    return config.make_wsgi_app()


@contextlib.contextmanager
def tables(shape: Shape, *sides: Side) -> Iterator[None]:
    for side in sides:
        for base in shape.bases:
            base.metadata.create_all(side.engine)
    try:
        yield
    finally:
        for side in sides:
            side.engine.dispose()
            for base in shape.bases:
                base.metadata.drop_all(side.engine)


class Sync:
    """Both apps of a case: the facade served on loopback, central's
    Communicator pointed at it."""

    def __init__(self, central: Side, facade: Side, shape: Shape, url: str,
                 facade_app: Any) -> None:
        self.sides = {CENTRAL: central, FACADE: facade}
        self.central_app = make_app(central, shape, **{'communicator.base_uri': url})
        self.apps = {CENTRAL: self.central_app, FACADE: facade_app}

    @contextlib.contextmanager
    def session(self, name: str) -> Iterator[Session]:
        """A session on a side's database, as the app's own would be:
        ``send`` finds the app's settings on it."""
        with self.sides[name].session() as session:
            session.info[SETTINGS_INFO] = get_settings(self.apps[name].registry)
            yield session

    def run(self) -> None:
        registry = self.central_app.registry
        communicator = Communicator(get_settings(registry), self.sides[CENTRAL].engine,
                                    registry=registry)
        try:
            communicator.communicate()
        finally:
            communicator.close()

    def close(self) -> None:
        for app in self.apps.values():
            app.registry['dbsession_factory'].kw['bind'].dispose()


def run_case(shape: Shape, ctx: Context, central: Side, facade: Side) -> tuple[Any, Any]:
    """Play the shape's rounds; the receiver's state and its expected one."""
    with tables(shape, central, facade):
        facade_app = make_app(facade, shape)
        with serve_wsgi(facade_app) as url:
            sync = Sync(central, facade, shape, url, facade_app)
            try:
                if shape.prepare is not None:
                    with sync.session(ctx.receiver) as session:
                        shape.prepare(session, ctx)
                meanwhile = dict(shape.meanwhile)
                for index, write in enumerate(shape.rounds):
                    with sync.session(ctx.sender) as session:
                        write(session, ctx)
                    if index in meanwhile:
                        with sync.session(ctx.receiver) as session:
                            meanwhile[index](session, ctx)
                    sync.run()
                problems = queue_problems(central) + queue_problems(facade)
                assert not problems, problems
                with sync.session(ctx.receiver) as session:
                    return shape.state(session), shape.expected(ctx)
            finally:
                sync.close()


@pytest.mark.parametrize('direction', DIRECTIONS)
@pytest.mark.parametrize('shape', SHAPES, ids=lambda shape: shape.name)
def test_the_receiver_holds_what_the_sender_wrote(shape, central_db, facade_db, direction,
                                                  make_side, record_property):
    # for benchmarks/matrix_report.py's table (pytest's --junitxml)
    record_property('matrix', f'{shape.name} {central_db}/{facade_db} {direction}')
    skip_unreachable(central_db, facade_db)
    ctx = Context(DIRECTIONS[direction], central_db, facade_db)
    reason = shape.skip(ctx) if shape.skip is not None else None
    if reason:
        pytest.skip(reason)
    central = make_side(CENTRAL, backend=central_db)
    facade = make_side(FACADE, backend=facade_db)
    found, wanted = run_case(shape, ctx, central, facade)
    assert found == wanted

