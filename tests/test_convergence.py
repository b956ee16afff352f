"""Randomized convergence: two real apps edit the same records at once,
exchange at random moments, and must end up identical.

For every seed, a random sequence of operations runs on both sides the way
each app writes (ORM sessions on its own database, autopublish for Tags,
Notes and Comments, ``publish`` for Posts and their tags; on the facade
some go through its HTTP views): Tags created (often the same name on both
sides, so ``match_on`` merges them), updated and deleted, updated on a
side while deleted on the other, Posts and Comments created and updated,
Notes (a UUID key) created (sometimes under a UUID the other side made and
has not sent yet), updated and deleted, tags added to posts and removed
(a many-to-many: membership changes, concurrent on both sides), and
exchanges in between
(central's in-process ``Communicator`` against the served facade): push
only, pull only (applied, or only stored), or both.  Then quiet exchanges,
the last a real ``pcommunicate``, and both databases must hold the same
records with the same synced attributes, nothing failed or refused,
nothing left to send; and ``pcommunicate --verify`` finds them equal.

``COMMUNICATOR_CONVERGENCE_SEEDS=30`` runs more seeds,
``COMMUNICATOR_CONVERGENCE_SEED=N`` starts at another one (with
``COMMUNICATOR_CONVERGENCE_SEEDS=1``: replays seed N), and
``COMMUNICATOR_CONVERGENCE_TRACE=1`` prints both sides' tags after every
step.  With ``-s`` every seed prints a figures line, and the run a total.

Sequences that once diverged, reduced to a few operations, run as tests
of their own (:data:`REDUCED`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import time
from collections.abc import Iterator

import pytest
from conftest import Central, Server, app_settings
from convergence import (
    TAG_ATTRS,
    Editor,
    conflicts,
    differences,
    mappings,
    queue_problems,
    trace,
)

from pyramid_communicator.settings import parse_settings
from pyramid_communicator.sync import Communicator

DEFAULT_SEEDS = 6
DEFAULT_BASE_SEED = 20240601
TRACE = bool(os.environ.get('COMMUNICATOR_CONVERGENCE_TRACE'))
#: Few names, so that both sides often create the same one.
TAG_NAMES = tuple(f't{i}' for i in range(8))
#: Operations and exchanges per seed.
STEPS = (40, 60)


def _seeds() -> list[int]:
    count = int(os.environ.get('COMMUNICATOR_CONVERGENCE_SEEDS', DEFAULT_SEEDS))
    base = int(os.environ.get('COMMUNICATOR_CONVERGENCE_SEED', DEFAULT_BASE_SEED))
    return list(range(base, base + max(1, count)))


# -- the random sequence -------------------------------------------------------------

@dataclasses.dataclass
class Run:
    seed: int
    operations: int = 0
    exchanges: int = 0
    log: list[str] = dataclasses.field(default_factory=list)

    def note(self, side: str, what: str) -> None:
        self.log.append(f'{len(self.log):3d} {side:8s} {what}')
        if side != 'exchange':
            self.operations += 1


class Sequence:
    """Random operations on both sides, and exchanges between them."""

    def __init__(self, editor: Editor, communicator: Communicator, run: Run) -> None:
        self.editor = editor
        self.communicator = communicator
        self.run = run
        self.rng = editor.rng

    def step(self) -> None:
        """One random operation or exchange (nothing, when it has no record
        to work on)."""
        rng = self.rng
        side = rng.choice(('central', 'facade'))
        other = 'facade' if side == 'central' else 'central'
        if rng.random() < 0.3:
            self.step_keys_and_links(side, other)
            return
        roll = rng.random()
        if roll < 0.18:
            self.exchange(rng.choice(('push', 'pull', 'pull-store', 'both', 'both')))
        elif roll < 0.36:
            self.create_tag(side, other)
        elif roll < 0.60:
            self.update_tag(side, rng.choice(sorted(self.editor.tags(side)) or [None]))
        elif roll < 0.68:
            # The same tag edited on both sides before they exchange.
            both = sorted(set(self.editor.tags(side)) & set(self.editor.tags(other)))
            if both:
                name = rng.choice(both)
                self.update_tag(side, name)
                self.update_tag(other, name)
        elif roll < 0.78:
            names = sorted(self.editor.tags(side))
            if names:
                name = rng.choice(names)
                self.run.note(side, f'delete tag {name}' + self.editor.delete_tag(side, name))
        elif roll < 0.84:
            values = {'slug': self.editor.unique(f'p-{side[0]}'), **self.editor.post_values()}
            self.run.note(side, f'create post {values}' + self.editor.create_post(side, values))
        elif roll < 0.92:
            posts = self.editor.ids(side, 'posts')
            if posts:
                post_id = rng.choice(posts)
                values = self.editor.post_values(tuple(sorted(rng.sample(
                    ('title', 'body', 'published_on'), rng.randint(1, 2)))))
                self.run.note(side, f'update post #{post_id} {values}'
                              + self.editor.update_post(side, post_id, values))
        elif roll < 0.96:
            posts = self.editor.ids(side, 'posts')
            if posts:
                post_id, body = rng.choice(posts), self.editor.unique(f'c-{side[0]}')
                self.run.note(side, f'create comment {body!r} on post #{post_id}'
                              + self.editor.create_comment(side, post_id, body))
        else:
            comments = self.editor.ids(side, 'comments')
            if comments:
                comment_id = rng.choice(comments)
                body = rng.choice((self.editor.unique('cb'), 'same comment'))
                self.run.note(side, f'update comment #{comment_id} body={body!r}'
                              + self.editor.update_comment(side, comment_id, body))

    def step_keys_and_links(self, side: str, other: str) -> None:
        """A Note created, updated or deleted, or a post's tags changed."""
        rng, editor = self.rng, self.editor
        roll = rng.random()
        if roll < 0.2:
            theirs = sorted(set(editor.notes(other)) - set(editor.notes(side)))
            # Sometimes a UUID the other side made (and may not have sent
            # yet): both sides create one record.
            key = rng.choice(theirs) if theirs and rng.random() < 0.3 else editor.new_key()
            values = editor.note_values()
            self.run.note(side, f'create note {key} {values}'
                          + editor.create_note(side, key, values))
        elif roll < 0.4:
            notes = sorted(editor.notes(side))
            if notes:
                key = rng.choice(notes)
                values = editor.note_values(tuple(sorted(rng.sample(
                    ('title', 'body'), rng.randint(1, 2)))))
                self.run.note(side, f'update note {key} {values}'
                              + editor.update_note(side, key, values))
        elif roll < 0.5:
            notes = sorted(editor.notes(side))
            if notes:
                key = rng.choice(notes)
                self.run.note(side, f'delete note {key}' + editor.delete_note(side, key))
        else:
            posts = editor.post_tags(side)
            tags = sorted(editor.tags(side))
            if not posts or not tags:
                return
            post_id = rng.choice(sorted(posts))
            held = posts[post_id]
            free = [name for name in tags if name not in held]
            add = tuple(rng.sample(free, min(len(free), rng.randint(0, 2))))
            remove = tuple(rng.sample(held, min(len(held), rng.randint(0, 1))))
            if add or remove:
                self.run.note(side, f'post #{post_id} tags +{list(add)} -{list(remove)}'
                              + editor.change_tags(side, post_id, add, remove))

    def create_tag(self, side: str, other: str) -> None:
        """A name this side does not hold; half the time one the other side
        holds, so that both sides create the same tag."""
        held = self.editor.tags(side)
        free = [name for name in TAG_NAMES if name not in held]
        if not free:
            return
        theirs = [name for name in free if name in self.editor.tags(other)]
        name = self.rng.choice(theirs if theirs and self.rng.random() < 0.5 else free)
        values = self.editor.tag_values(side)
        self.run.note(side, f'create tag {name} {values}'
                      + self.editor.create_tag(side, name, values))

    def update_tag(self, side: str, name: str | None) -> None:
        if name is None:
            return
        values = self.editor.tag_values(side, self.editor.tag_keys())
        then = self.editor.tag_values(side, ('weight',)) if self.rng.random() < 0.1 else None
        how = self.editor.update_tag(side, name, values, then)
        self.run.note(side, f'update tag {name} {values}'
                      + (f' then {then}' if then else '') + how)

    def exchange(self, kind: str) -> None:
        """push, pull (and apply), pull-store (applied by a later
        exchange) or both."""
        communicator = self.communicator
        if kind == 'push':
            done = f'pushed={communicator.push()}'
        elif kind == 'pull-store':
            done = f'pulled={communicator.pull()}'
        else:
            summary = communicator.communicate(push=kind == 'both')
            done = str(summary).split(' seconds')[0]
        self.run.exchanges += 1
        self.run.note('exchange', f'{kind}: {done}')


# -- sequences the randomized test found, reduced --------------------------------------

#: Each a minimal sequence that once ended with both sides different:
#: (side, 'create' | 'update', name, values), (side, 'delete', name) or
#: ('exchange', 'push' | 'pull' | 'both').  Quiet exchanges follow.
REDUCED: dict[str, list[tuple]] = {
    # The facade merges central's x with its own by match_on, then the
    # delete of central's x deletes it; central never merged them.
    'create and delete vs a create of the same name': [
        ('central', 'create', 'x', {'label': 'c'}),
        ('central', 'delete', 'x'),
        ('facade', 'create', 'x', {'label': 'f'}),
    ],
    'merged on one side, then deleted by the other': [
        ('facade', 'create', 'x', {'label': 'f'}),
        ('central', 'create', 'x', {'label': 'c'}),
        ('exchange', 'pull'),
        ('facade', 'delete', 'x'),
    ],
    # SQLite hands the id of a deleted record to the next one.
    'an id handed anew meets a create of the same name': [
        ('facade', 'create', 'a', {}),
        ('exchange', 'both'),
        ('facade', 'delete', 'a'),
        ('exchange', 'both'),
        ('facade', 'create', 'b', {'label': 'f'}),
        ('central', 'create', 'b', {'label': 'c'}),
    ],
    'an update of a deleted record whose id was handed anew': [
        ('central', 'create', 'x', {'label': 'x0'}),
        ('exchange', 'both'),
        ('central', 'delete', 'x'),
        ('central', 'create', 'y', {'label': 'y0'}),
        ('facade', 'update', 'x', {'label': 'from-facade'}),
    ],
    'created again after both sides deleted it': [
        ('central', 'create', 'x', {'label': 'c1'}),
        ('exchange', 'push'),
        ('facade', 'delete', 'x'),
        ('central', 'delete', 'x'),
        ('exchange', 'both'),
        ('central', 'create', 'x', {'label': 'c2'}),
    ],
    'deleted on both sides, then created again before they exchange': [
        ('facade', 'create', 'x', {'color': 'red', 'weight': 0}),
        ('exchange', 'both'),
        ('facade', 'delete', 'x'),
        ('central', 'delete', 'x'),
        ('central', 'create', 'x', {'label': 'beta', 'weight': 2}),
    ],
    'created, deleted on both sides, then created again before they exchange': [
        ('facade', 'create', 'x', {'label': 'f1', 'weight': 2}),
        ('central', 'create', 'x', {'label': 'c1', 'weight': 1}),
        ('central', 'delete', 'x'),
        ('facade', 'delete', 'x'),
        ('facade', 'create', 'x', {'label': 'f2', 'weight': 0}),
    ],
    'created again on one side, created and edited on the other': [
        ('central', 'create', 'x', {'label': 'c1', 'weight': 1}),
        ('facade', 'create', 'x', {'label': 'f1', 'weight': 3}),
        ('central', 'delete', 'x'),
        ('central', 'create', 'x', {'label': 'c2', 'color': 'red', 'weight': 3}),
        ('facade', 'update', 'x', {'label': 'f2', 'weight': 0}),
    ],
    'created again on one side, then edited on the other': [
        ('facade', 'create', 'x', {'label': 'f1', 'color': 'blue', 'weight': 0}),
        ('facade', 'delete', 'x'),
        ('central', 'create', 'x', {'color': 'green', 'weight': 1}),
        ('facade', 'create', 'x', {'label': 'gamma', 'color': 'red', 'weight': 3}),
        ('central', 'update', 'x', {'color': None}),
    ],
}


@pytest.mark.parametrize('name', list(REDUCED))
def test_reduced_sequence_converges(pair, name):
    central, facade = pair
    editor = Editor({'central': central.side, 'facade': facade.side}, random.Random(0))
    run = Run(0)
    with communicator_for(central, facade) as communicator:
        sequence = Sequence(editor, communicator, run)
        for side, what, *args in REDUCED[name] + [('exchange', 'both')] * 3:
            if side == 'exchange':
                sequence.exchange(what)
            else:
                action = {'create': editor.create_tag, 'update': editor.update_tag,
                          'delete': editor.delete_tag}[what]
                run.note(side, f'{what} tag {args}' + action(side, *args))
    problems = (differences(central.side, facade.side) + queue_problems(central.side)
                + queue_problems(facade.side))
    assert not problems, '\n'.join(problems + run.log)


def test_a_post_published_after_a_tag_of_it_was_deleted_converges(pair):
    """Reduced from seed 20240605: central tags its post and deletes the
    tag before they exchange; the facade applies the link, then the delete.
    When the facade later changes the post's tags, it must not send the
    removal of a link to the tag it no longer holds (named as a tag of its
    own, central could never find it: a message failing for ever)."""
    central, facade = pair
    editor = Editor({'central': central.side, 'facade': facade.side}, random.Random(0))
    run = Run(0)
    with communicator_for(central, facade) as communicator:
        sequence = Sequence(editor, communicator, run)
        editor.create_tag('central', 'gone', {})
        editor.create_tag('central', 'kept', {})
        editor.create_post('central', {'title': 'Hello', 'slug': 'p'})
        [post] = editor.ids('central', 'posts')
        editor.change_tags('central', post, add=('gone', 'kept'))
        editor.delete_tag('central', 'gone')
        sequence.exchange('both')
        [copy] = editor.ids('facade', 'posts')
        assert editor.post_tags('facade') == {copy: ['kept']}
        editor.create_tag('facade', 'new', {})
        editor.change_tags('facade', copy, add=('new',), remove=('kept',))
        for _ in range(3):
            sequence.exchange('both')
    problems = (differences(central.side, facade.side) + queue_problems(central.side)
                + queue_problems(facade.side))
    assert not problems, '\n'.join(problems + run.log)
    assert editor.post_tags('central') == {post: ['new']}


def test_a_tag_given_the_id_of_a_deleted_one_is_linked_on_both_sides(pair):
    """SQLite hands the id of a deleted tag to the next one: that tag added
    to the post the deleted one was on must travel as a new link."""
    central, facade = pair
    editor = Editor({'central': central.side, 'facade': facade.side}, random.Random(0))
    run = Run(0)
    with communicator_for(central, facade) as communicator:
        sequence = Sequence(editor, communicator, run)
        editor.create_tag('central', 'old', {})
        editor.create_post('central', {'title': 'Hello', 'slug': 'p'})
        [post] = editor.ids('central', 'posts')
        editor.change_tags('central', post, add=('old',))
        sequence.exchange('both')
        editor.delete_tag('central', 'old')
        editor.create_tag('central', 'new', {})
        editor.change_tags('central', post, add=('new',))
        for _ in range(2):
            sequence.exchange('both')
    problems = (differences(central.side, facade.side) + queue_problems(central.side)
                + queue_problems(facade.side))
    assert not problems, '\n'.join(problems + run.log)
    assert list(editor.post_tags('facade').values()) == [['new']]


# -- the test --------------------------------------------------------------------------

@dataclasses.dataclass
class Figures:
    seed: int
    operations: int
    exchanges: int
    conflicts: int
    divergences: int
    queue_problems: int
    seconds: float


@pytest.fixture(scope='module')
def totals(backend) -> Iterator[list[Figures]]:
    """Figures of every seed; their sum is printed at the end (with ``-s -n 0``)."""
    results: list[Figures] = []
    yield results
    if results:
        print(f'\nconvergence on {backend}: seeds={len(results)} '
              f'operations={sum(r.operations for r in results)} '
              f'exchanges={sum(r.exchanges for r in results)} '
              f'conflicts={sum(r.conflicts for r in results)} '
              f'divergences={sum(r.divergences for r in results)} '
              f'queue problems={sum(r.queue_problems for r in results)} '
              f'failed seeds={sum(1 for r in results if r.divergences or r.queue_problems)} '
              f'seconds={sum(r.seconds for r in results):.1f}')


@contextlib.contextmanager
def communicator_for(central: Central, facade: Server) -> Iterator[Communicator]:
    """What pcommunicate does, in process: central's side of the exchange."""
    settings = parse_settings(app_settings(central.side,
                                           **{'communicator.base_uri': facade.url}))
    communicator = Communicator(settings, central.side.engine)
    try:
        yield communicator
    finally:
        communicator.close()


@pytest.mark.parametrize('seed', _seeds())
def test_both_sides_converge(pair, seed, backend, totals):
    central, facade = pair
    started = time.monotonic()
    rng = random.Random(seed)
    editor = Editor({'central': central.side, 'facade': facade.side}, rng,
                    facade_url=facade.url)
    run = Run(seed)
    replay = (f'replay: COMMUNICATOR_CONVERGENCE_SEED={seed} COMMUNICATOR_CONVERGENCE_SEEDS=1 '
              f'COMMUNICATOR_CONVERGENCE_TRACE=1 pytest -s tests/test_convergence.py '
              f'--db {backend}')
    steps = rng.randint(*STEPS)
    with communicator_for(central, facade) as communicator:
        sequence = Sequence(editor, communicator, run)
        try:
            while run.operations + run.exchanges < steps:
                logged = len(run.log)
                sequence.step()
                if TRACE and len(run.log) > logged:
                    print(*run.log[logged:], *trace(central.side, facade.side),
                          sep='\n    ')
            for _ in range(2):  # quiet exchanges
                sequence.exchange('both')
        except Exception as exc:
            raise AssertionError(f'seed {seed} on {backend} crashed: {exc!r}\n{replay}\n'
                                 + '\n'.join(run.log)) from exc
    central.sync()  # the last one for real
    run.exchanges += 1
    run.note('exchange', 'pcommunicate')
    verified = central.pcommunicate('--verify')

    found = differences(central.side, facade.side)
    problems = queue_problems(central.side) + queue_problems(facade.side)
    if verified.returncode != 0:
        problems.append(f'pcommunicate --verify exited {verified.returncode}: '
                        f'{verified.stdout}{verified.stderr}')
    figures = Figures(seed, run.operations, run.exchanges,
                      conflicts(central.side, facade.side), len(found), len(problems),
                      time.monotonic() - started)
    totals.append(figures)
    print(f'\nconvergence seed={seed} backend={backend} operations={figures.operations} '
          f'exchanges={figures.exchanges} conflicts={figures.conflicts} '
          f'divergences={len(found)} queue problems={len(problems)} '
          f'seconds={figures.seconds:.1f}')
    if found or problems:
        tags = [f'{side.name} tags: ' + ', '.join(
            f'{row["id"]}:{row["name"]}=' + '/'.join(str(row[key]) for key in TAG_ATTRS)
            for row in side.rows('tags')) for side in (central.side, facade.side)]
        raise AssertionError(
            f'seed {seed} on {backend}: {len(found)} records differ, {len(problems)} '
            f'queue problems\n{replay}\n' + '\n'.join(
                found + problems + tags + mappings(central.side) + mappings(facade.side))
            + '\noperations:\n' + '\n'.join(run.log))
