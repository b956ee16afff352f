"""Shared by tests/test_convergence.py and the fault harness: writing the
demo's records on either side as its app would, and comparing both sides'
synced state.

- :class:`Editor` creates, updates and deletes Tags (autopublished, deletes
  travel, ``match_on`` name), Posts (``publish`` by hand) and Comments
  (autopublished, a foreign key to posts), Notes (a UUID key, autopublished,
  deletes travel), and adds tags to posts and removes them (a many-to-many,
  sent with ``publish`` of the post) on central (its database, through ORM
  sessions) or on the facade (its database too, or its HTTP views).
- :func:`differences` lists every record whose synced attributes differ
  between the two sides: Tags by name, Notes by their UUID, Posts and
  Comments by their identity in ``communicator_mappings``, and the links
  between posts and tags as (the post's identity, the tag's name).
- :func:`queue_problems` lists inbound messages not applied (failed,
  refused, given up) and undelivered outbound messages.
"""
from __future__ import annotations

import datetime
import random
import uuid
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import requests
from sqlalchemy import select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Comment, Note, Post, Tag

TAG_ATTRS = ('label', 'color', 'weight')
#: Small value sets, so that both sides sometimes write the same value;
#: None is a value too.
TAG_VALUES: dict[str, tuple[Any, ...]] = {
    'label': ('alpha', 'beta', 'gamma', None),
    'color': ('red', 'green', 'blue', None),
    'weight': (0, 1, 2, 3, None),
}
POST_TITLES = ('Hello', 'News', 'Update', 'Notes')
POST_ATTRS = ('title', 'body', 'published_on')
NOTE_ATTRS = ('title', 'body')
NOTE_VALUES: dict[str, tuple[Any, ...]] = {
    'title': ('todo', 'done', 'later', None),
    'body': ('short', 'long', None),
}


class SideLike(Protocol):
    name: str
    engine: Engine

    def session(self) -> AbstractContextManager[Session]: ...
    def count(self, table: str, where: str = '1=1') -> int: ...
    def rows(self, table: str, order_by: str = 'id') -> list[dict]: ...


def _ok(response: requests.Response) -> dict:
    response.raise_for_status()
    return response.json()


def _json(values: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value.isoformat() if isinstance(value, datetime.datetime) else value
            for key, value in values.items()}


class Editor:
    """Writes records on either side the way each app does.

    ``sides`` maps 'central' and 'facade' to their databases; with
    ``facade_url``, a share ``http_share`` of the facade's writes go
    through the demo app's views instead (same transactions as a request).
    Every write is one transaction; the methods return ' (http)' when the
    facade's views made it, for logs.
    """

    def __init__(self, sides: Mapping[str, SideLike], rng: random.Random,
                 facade_url: str | None = None, http_share: float = 0.3) -> None:
        self.sides = dict(sides)
        self.rng = rng
        self.facade_url = facade_url
        self.http_share = http_share if facade_url else 0.0
        self.serial = 0

    def unique(self, prefix: str) -> str:
        self.serial += 1
        return f'{prefix}{self.serial}'

    def _http(self, side: str) -> bool:
        return side == 'facade' and self.rng.random() < self.http_share

    # -- reading -------------------------------------------------------------------

    def tags(self, side: str) -> dict[str, dict]:
        """Name -> row of the side's tags."""
        return {row['name']: row for row in self.sides[side].rows('tags')}

    def ids(self, side: str, table: str) -> list[int]:
        return [row['id'] for row in self.sides[side].rows(table)]

    # -- Tags ------------------------------------------------------------------------

    def tag_values(self, side: str, keys: tuple[str, ...] = TAG_ATTRS) -> dict[str, Any]:
        """Random values; a label is sometimes one nobody else writes."""
        values = {}
        for key in keys:
            if key == 'label' and self.rng.random() < 0.4:
                values[key] = self.unique(side[0])
            else:
                values[key] = self.rng.choice(TAG_VALUES[key])
        return values

    def tag_keys(self) -> tuple[str, ...]:
        return tuple(sorted(self.rng.sample(TAG_ATTRS, self.rng.randint(1, len(TAG_ATTRS)))))

    def create_tag(self, side: str, name: str, values: Mapping[str, Any]) -> str:
        values = {'name': name, **values}
        if self._http(side):
            _ok(requests.post(f'{self.facade_url}/tags', json=values, timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            session.add(Tag(**values))
        return ''

    def update_tag(self, side: str, name: str, values: Mapping[str, Any],
                   then: Mapping[str, Any] | None = None) -> str:
        """Set ``values``; with ``then``, flush and set those too in the
        same transaction (two edits, two messages)."""
        if self._http(side) and then is None:
            tag_id = self.tags(side)[name]['id']
            _ok(requests.post(f'{self.facade_url}/tags/{tag_id}', json=dict(values),
                              timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            tag = session.scalars(select(Tag).where(Tag.name == name)).one()
            for key, value in values.items():
                setattr(tag, key, value)
            if then is not None:
                session.flush()
                for key, value in then.items():
                    setattr(tag, key, value)
        return ''

    def delete_tag(self, side: str, name: str) -> str:
        if self._http(side):
            tag_id = self.tags(side)[name]['id']
            _ok(requests.delete(f'{self.facade_url}/tags/{tag_id}', timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            session.delete(session.scalars(select(Tag).where(Tag.name == name)).one())
        return ''

    # -- Posts and Comments ------------------------------------------------------------

    def post_values(self, keys: tuple[str, ...] = POST_ATTRS) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for key in keys:
            if key == 'title':
                values[key] = self.rng.choice(POST_TITLES)
            elif key == 'body':
                values[key] = self.rng.choice((self.unique('b'), 'same body', None))
            else:  # whole seconds: every backend keeps them as they are
                values[key] = datetime.datetime(2024, 1, 1) + datetime.timedelta(
                    seconds=self.rng.randrange(10 ** 6))
        return values

    def create_post(self, side: str, values: Mapping[str, Any]) -> str:
        if self._http(side):
            _ok(requests.post(f'{self.facade_url}/posts', json=_json(values), timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            post = Post(**values)
            session.add(post)
            session.flush()
            publish(session, post)
        return ''

    def update_post(self, side: str, post_id: int, values: Mapping[str, Any]) -> str:
        # The demo's view cannot set published_on to None.
        if self._http(side) and values.get('published_on', True) is not None:
            _ok(requests.post(f'{self.facade_url}/posts/{post_id}', json=_json(values),
                              timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            post = session.get(Post, post_id)
            for key, value in values.items():
                setattr(post, key, value)
            session.flush()
            publish(session, post)
        return ''

    def create_comment(self, side: str, post_id: int, body: str) -> str:
        with self.sides[side].session() as session:
            session.add(Comment(post_id=post_id, title='stays local', body=body))
        return ''

    def update_comment(self, side: str, comment_id: int, body: str) -> str:
        with self.sides[side].session() as session:
            session.get(Comment, comment_id).body = body
        return ''

    # -- Notes (a UUID key) --------------------------------------------------------------

    def notes(self, side: str) -> dict[uuid.UUID, tuple]:
        """UUID -> (title, body) of the side's notes (read through the ORM:
        each backend stores a UUID its own way)."""
        return notes_of(self.sides[side])

    def new_key(self) -> uuid.UUID:
        """A random UUID from the seed: a replay makes the same ones."""
        return uuid.UUID(int=self.rng.getrandbits(128), version=4)

    def note_values(self, keys: tuple[str, ...] = NOTE_ATTRS) -> dict[str, Any]:
        values = {}
        for key in keys:
            if key == 'body' and self.rng.random() < 0.3:
                values[key] = self.unique('n')
            else:
                values[key] = self.rng.choice(NOTE_VALUES[key])
        return values

    def create_note(self, side: str, key: uuid.UUID, values: Mapping[str, Any]) -> str:
        if self._http(side):
            _ok(requests.post(f'{self.facade_url}/notes', json={'id': str(key), **values},
                              timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            session.add(Note(id=key, **values))
        return ''

    def update_note(self, side: str, key: uuid.UUID, values: Mapping[str, Any]) -> str:
        if self._http(side):
            _ok(requests.post(f'{self.facade_url}/notes/{key}', json=dict(values),
                              timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            note = session.get(Note, key)
            for attribute, value in values.items():
                setattr(note, attribute, value)
        return ''

    def delete_note(self, side: str, key: uuid.UUID) -> str:
        if self._http(side):
            _ok(requests.delete(f'{self.facade_url}/notes/{key}', timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            session.delete(session.get(Note, key))
        return ''

    # -- a post's tags (many-to-many) ------------------------------------------------------

    def post_tags(self, side: str) -> dict[int, list[str]]:
        """Post id -> the names of its tags, of every post of the side."""
        with self.sides[side].session() as session:
            return {post.id: [tag.name for tag in post.tags]
                    for post in session.scalars(select(Post).order_by(Post.id))}

    def change_tags(self, side: str, post_id: int, add: tuple[str, ...] = (),
                    remove: tuple[str, ...] = ()) -> str:
        """Add and remove tags of a post by name, and publish the post (its
        links go with it), in one transaction."""
        if self._http(side):
            tags = [name for name in self.post_tags(side)[post_id] if name not in remove]
            _ok(requests.post(f'{self.facade_url}/posts/{post_id}',
                              json={'tags': tags + list(add)}, timeout=30))
            return ' (http)'
        with self.sides[side].session() as session:
            post = session.get(Post, post_id)
            for name in add:
                post.tags.append(session.scalars(select(Tag).where(Tag.name == name)).one())
            for name in remove:
                post.tags.remove(next(tag for tag in post.tags if tag.name == name))
            session.flush()
            publish(session, post)
        return ''


# -- comparing both sides ----------------------------------------------------------------

def identities(side: SideLike, name: str) -> dict[int, tuple]:
    """Local id -> the live record's identities, (app, id there), sorted."""
    found: dict[int, list] = {}
    for row in side.rows('communicator_mappings'):
        if row['name'] == name and row['local_id'] is not None:
            found.setdefault(row['local_id'], []).append(
                (row['origin'] or side.name, row['original_id']))
    return {local: tuple(sorted(ids)) for local, ids in found.items()}


def _by_identity(side: SideLike, name: str, table: str,
                 state: Callable[[dict], tuple]) -> dict[tuple, tuple]:
    """A table's records keyed by their first identity (a record never
    published is keyed as untracked: it has no copy on the other side)."""
    ids = identities(side, name)
    return {ids.get(row['id'], (('untracked', side.name, row['id']),))[0]: state(row)
            for row in side.rows(table)}


def notes_of(side: SideLike) -> dict[uuid.UUID, tuple]:
    with side.session() as session:
        return {note.id: tuple(getattr(note, key) for key in NOTE_ATTRS)
                for note in session.scalars(select(Note))}


def links_of(side: SideLike) -> dict[tuple, str]:
    """The side's links between posts and tags, as (the post's identity,
    the tag's name): local ids differ between the sides."""
    posts = identities(side, 'post')
    names = {row['id']: row['name'] for row in side.rows('tags')}
    return {(posts.get(row['post_id'], (('untracked', side.name, row['post_id']),))[0],
             names[row['tag_id']]): 'linked'
            for row in side.rows('post_tags', 'post_id, tag_id')}


def snapshot(side: SideLike) -> dict[str, dict]:
    """The synced state of one side, keyed the same way on both: Tags by
    name (label, color, weight); Notes by UUID (title, body); Posts (title,
    body, slug, published_on) and Comments (body, whom post_id points at)
    by identity; and which post has which tag."""
    posts = identities(side, 'post')
    return {
        'notes': notes_of(side),
        'post tags': links_of(side),
        'tags': {row['name']: tuple(row[key] for key in TAG_ATTRS)
                 for row in side.rows('tags')},
        'posts': _by_identity(side, 'post', 'posts', lambda row: (
            row['title'], row['body'], row['slug'], row['published_on'])),
        'comments': _by_identity(side, 'comment', 'comments', lambda row: (
            row['body'], posts.get(row['post_id'], (row['post_id'],))[0])),
    }


def differences(central: SideLike, facade: SideLike) -> list[str]:
    """Every record whose synced state differs between the two sides."""
    mine, theirs = snapshot(central), snapshot(facade)
    found = []
    for kind in mine:
        for key in sorted(set(mine[kind]) | set(theirs[kind]), key=repr):
            a, b = mine[kind].get(key, 'missing'), theirs[kind].get(key, 'missing')
            if a != b:
                found.append(f'{kind} {key!r}: central={a!r} facade={b!r}')
    return found


def queue_problems(side: SideLike) -> list[str]:
    """Inbound messages not applied (failed, refused, given up) and
    outbound messages not delivered."""
    problems = [f'{side.name} inbound #{row["id"]} from {row["sender"]} not applied '
                f'(attempts={row["attempts"]}, refused={row["refused_at"] is not None}): '
                f'{row["last_error"]} body={row["body"]}'
                for row in side.rows('inbound_messages')
                if row['processed_at'] is None or row['refused_at'] is not None
                or row['given_up_at'] is not None]
    pending = side.count('outbound_messages', 'delivered_at IS NULL')
    if pending:
        problems.append(f'{side.name} has {pending} undelivered outbound messages')
    return problems


def conflicts(*sides: SideLike) -> int:
    """Conflicts recorded, on all the sides together."""
    return sum(side.count('communicator_conflicts') for side in sides)


def mappings(side: SideLike, name: str = 'tag') -> list[str]:
    """The side's identities and versions of one model, for failure messages."""
    return [f'{side.name} mapping {row["origin"] or "(here)"}#{row["original_id"]} -> '
            f'{row["local_id"]}: {row["version"]}'
            for row in side.rows('communicator_mappings') if row['name'] == name]


def trace(*sides: SideLike) -> list[str]:
    """One line per side: its tags (id:name=label/color/weight) and tag
    identities, to follow a replayed sequence step by step."""
    lines = []
    for side in sides:
        tags = ', '.join(f'{row["id"]}:{row["name"]}={row["label"]}/{row["color"]}/'
                         f'{row["weight"]}' for row in side.rows('tags'))
        maps = ', '.join(f'{row["origin"] or "here"}#{row["original_id"]}->{row["local_id"]}'
                         for row in side.rows('communicator_mappings')
                         if row['name'] == 'tag')
        lines.append(f'{side.name}: tags [{tags}] mappings [{maps}]')
    return lines
