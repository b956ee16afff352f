"""Foreign keys between synced models point at the receiver's own copies:
a comment on central's post 1 is, at the facade, a comment on the
facade's copy of that post, whatever its id there."""
from __future__ import annotations

import dataclasses
import json

from test_records import add_post, apply, deliver, forward, message

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Comment, Post


def comments(side):
    return {row['body']: row['post_id'] for row in side.rows('comments')}


def test_a_comment_points_at_the_receivers_copy_of_its_post(make_side):
    central, facade = make_side('central'), make_side('facade')
    add_post(facade, title='Only on the facade')  # takes id 1 there
    central_post = add_post(central, title='Central post')
    with central.session() as session:
        post = session.get(Post, central_post)
        publish(session, post)
        session.add(Comment(post_id=post.id, body='On central post'))  # autopublished
    refs = [row['refs'] for row in central.rows('outbound_messages')]
    assert refs[0] is None and json.loads(refs[1]) == {'post_id': [None, central_post]}

    forward(central, facade)
    assert apply(facade).applied == 2
    copy = next(r['id'] for r in facade.rows('posts') if r['title'] == 'Central post')
    assert copy != central_post
    assert comments(facade) == {'On central post': copy}

    # and back: a comment made on the facade's copy means central's original
    with facade.session() as session:
        session.add(Comment(post_id=copy, body='Reply from the facade'))
    with facade.engine.begin() as conn:  # keep only the new message
        conn.exec_driver_sql('DELETE FROM outbound_messages WHERE id < '
                             '(SELECT MAX(id) FROM outbound_messages)')
    forward(facade, central)
    assert apply(central).applied == 1
    assert comments(central)['Reply from the facade'] == central_post


def with_refs(wire_message, refs):
    return dataclasses.replace(wire_message, refs=refs)


def test_a_comment_that_arrives_before_its_post_waits_for_it(make_side):
    facade = make_side('facade')
    deliver(facade, with_refs(message(1, 'comment', {'body': 'Early'}, 'central', 5),
                              {'post_id': ['central', 42]}), sender='central')
    assert apply(facade).failed == 1  # the referenced post is not here yet
    [early] = facade.rows('inbound_messages')
    assert 'not here (yet)' in early['last_error']

    deliver(facade, message(2, 'post', {'title': 'Late post'}, 'central', 42), sender='central')
    # the comment, tried first, waits for the rest of the run: then the post is here
    result = apply(facade)
    assert (result.applied, result.failed, result.retried) == (2, 0, 1)
    post = next(r['id'] for r in facade.rows('posts') if r['title'] == 'Late post')
    assert comments(facade) == {'Early': post}


def test_a_foreign_key_without_refs_is_refused_never_taken_as_a_local_id(make_side):
    """A raw value would be one of the receiver's ids, chosen by the peer:
    a comment on a post never shared with it (the gem sent such values)."""
    facade = make_side('facade')
    local_post = add_post(facade, title='Never shared')
    deliver(facade, message(1, 'comment', {'body': 'Attached?', 'post_id': local_post},
                            'central', 5), sender='central')
    assert apply(facade).failed == 1
    [row] = facade.rows('inbound_messages')
    assert row['refused_at'] is not None
    assert 'comment.post_id without saying whom it refers to' in row['last_error']
    assert comments(facade) == {}
