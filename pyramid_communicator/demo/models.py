"""The demo app's models and session wiring, as in the Pyramid
SQLAlchemy cookiecutter: ``request.dbsession`` joined to ``request.tm``."""
from __future__ import annotations

import datetime
import uuid

import zope.sqlalchemy
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    Uuid,
    engine_from_config,
    event,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    mapped_column,
    relationship,
    sessionmaker,
    validates,
)

from pyramid_communicator import receives_from
from pyramid_communicator.models import NAMING_CONVENTION


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


#: Which tags a post has: a many-to-many whose links travel as changes of
#: membership (docs/models.rst, Many-to-many).
post_tags = Table(
    'post_tags', Base.metadata,
    Column('post_id', ForeignKey('posts.id'), primary_key=True),
    Column('tag_id', ForeignKey('tags.id'), primary_key=True))


@receives_from('post')
class Post(Base):
    __tablename__ = 'posts'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    body: Mapped[str | None] = mapped_column(Text)
    #: Unique, so that a conflicting record shows how failures are kept.
    slug: Mapped[str | None] = mapped_column(String(100), unique=True)
    published_on: Mapped[datetime.datetime | None] = mapped_column(DateTime)
    #: Posts are published by hand: ``publish(session, post)`` sends how
    #: its tags changed since it was last sent, with the post.
    tags: Mapped[list[Tag]] = relationship(secondary=post_tags, back_populates='posts',
                                           order_by='Tag.name')

    @validates('title')
    def _check_title(self, key, value):
        if not value or not value.strip():
            raise ValueError('a post needs a title')
        return value


@receives_from('comment', exclude=['title'], autopublish=True)
class Comment(Base):
    __tablename__ = 'comments'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    post_id: Mapped[int | None] = mapped_column(ForeignKey('posts.id'))
    title: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[str | None] = mapped_column(Text)


@receives_from('tag', autopublish=True, deletes=True, match_on=['name'])
class Tag(Base):
    """Edited on both sides: changes, creates of the same name and deletes
    all travel, and concurrent edits are settled attribute by attribute."""
    __tablename__ = 'tags'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    label: Mapped[str | None] = mapped_column(String(200))
    color: Mapped[str | None] = mapped_column(String(20))
    weight: Mapped[int | None] = mapped_column(Integer)
    posts: Mapped[list[Post]] = relationship(secondary=post_tags, back_populates='tags')


@receives_from('note', autopublish=True, deletes=True)
class Note(Base):
    """A UUID key, made by the app: the same note has the same id on both
    sides (docs/models.rst, Primary keys), edited and deleted on either."""
    __tablename__ = 'notes'
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    title: Mapped[str | None] = mapped_column(String(200))
    body: Mapped[str | None] = mapped_column(Text)


class ContactRequest(Base):
    """A visitor's message from the facade's contact form: on the facade
    the copy it sent (``sent``, then ``acknowledged``), on central the one
    it received (``received``).  Not a synced model: it travels as plain
    messages (see ``handlers``)."""
    __tablename__ = 'contact_requests'
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    email: Mapped[str] = mapped_column(String(200))
    text: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20))
    #: On central: the app that sent it, its message id and its own id.
    origin: Mapped[str | None] = mapped_column(String(64))
    message_id: Mapped[int | None] = mapped_column(Integer)
    ref: Mapped[int | None] = mapped_column(Integer)


def get_engine(settings, prefix='sqlalchemy.'):
    engine = engine_from_config(settings, prefix)
    if engine.dialect.name == 'sqlite':
        @event.listens_for(engine, 'connect')
        def _sqlite_pragmas(dbapi_connection, record):
            cursor = dbapi_connection.cursor()
            cursor.execute('PRAGMA journal_mode=WAL')
            cursor.execute('PRAGMA busy_timeout=30000')
            cursor.close()
    return engine


def get_session_factory(engine):
    return sessionmaker(bind=engine)


def get_tm_session(session_factory, transaction_manager, request=None):
    dbsession = session_factory(info={'request': request})
    zope.sqlalchemy.register(dbsession, transaction_manager=transaction_manager)
    return dbsession


def includeme(config):
    settings = config.get_settings()
    settings['tm.manager_hook'] = 'pyramid_tm.explicit_manager'
    config.include('pyramid_tm')
    engine = get_engine(settings)
    session_factory = get_session_factory(engine)
    config.registry['dbsession_factory'] = session_factory

    def dbsession(request):
        return get_tm_session(session_factory, request.tm, request=request)

    config.add_request_method(dbsession, reify=True)
