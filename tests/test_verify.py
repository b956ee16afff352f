"""``pcommunicate --verify`` and ``--repair`` against a real pair: drift
made by SQL run by hand on either side, found with the right exit status
and JSON, repaired through ordinary messages, and found in traffic that
grows with the differences, not with the table."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from pyramid_communicator import publish
from pyramid_communicator.demo.models import Comment, Post, Tag

DIFFERENT = 3


def verify(central, *args):
    result = central.pcommunicate('--verify', *args, '--json')
    assert 'Traceback' not in result.stderr, result.stderr
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def sql(side, *statements):
    with side.engine.begin() as conn:
        for statement in statements:
            conn.execute(text(statement))


def by_identity(report):
    return {(d['name'], tuple(d['identity'])): d for d in report['differences']}


@pytest.fixture
def synced_pair(pair):
    """Posts and comments of central's, tags of both, all synced."""
    central, facade = pair
    with central.side.session() as session:
        posts = [Post(title=f'post {i}', body=f'body {i}') for i in range(5)]
        session.add_all(posts)
        session.flush()
        for post in posts:
            publish(session, post)
        session.add_all(Comment(post_id=post.id, body=f'on {post.title}') for post in posts)
        session.add_all(Tag(name=f'c{i}', label=f'central {i}') for i in range(3))
    with facade.side.session() as session:
        session.add_all(Tag(name=f'f{i}', label=f'facade {i}') for i in range(3))
    central.sync()
    return central, facade


def test_equal_sides_verify_clean(synced_pair):
    central, facade = synced_pair
    result, report = verify(central)
    assert result.returncode == 0, result.stderr
    assert report['equal'] and report['differences'] == []
    assert report['names'] == ['comment', 'post', 'tag']
    text_result = central.pcommunicate('--verify')
    assert text_result.returncode == 0
    assert 'verify: equal' in text_result.stdout


@pytest.mark.slow
def test_drift_by_hand_is_found_and_repaired(synced_pair):
    central, facade = synced_pair
    c_post = central.side.rows('posts')[0]['id']
    f_comment = facade.side.rows('comments')[0]
    f_post = facade.side.rows('posts')[0]['id']
    f_tag = {row['name']: row['id'] for row in facade.side.rows('tags')}
    c_tag = {row['name']: row['id'] for row in central.side.rows('tags')}
    sql(central.side, f"UPDATE posts SET title = 'edited by hand' WHERE id = {c_post}",
        f"DELETE FROM tags WHERE id = {c_tag['f1']}")
    sql(facade.side, f"UPDATE tags SET label = 'label by hand' WHERE id = {f_tag['f0']}",
        f"DELETE FROM comments WHERE id = {f_comment['id']}",
        f"INSERT INTO comments (id, post_id, body) VALUES (900, {f_post}, 'restored')",
        "INSERT INTO communicator_mappings (name, origin, original_id, local_id, life) "
        "VALUES ('comment', '', 900, 900, 0)")

    result, report = verify(central)
    assert result.returncode == DIFFERENT, result.stderr
    found = by_identity(report)
    assert set(found) == {('post', ('central', c_post)), ('tag', ('facade', f_tag['f1'])),
                          ('tag', ('facade', f_tag['f0'])),
                          ('comment', ('central', f_comment['id'])),
                          ('comment', ('facade', 900))}
    post = found[('post', ('central', c_post))]
    assert post['central']['title'] == 'edited by hand'
    assert post['facade']['title'] == 'post 0'
    assert found[('tag', ('facade', f_tag['f1']))]['central'] == 'missing'
    assert found[('comment', ('central', f_comment['id']))]['facade'] == 'missing'
    restored = found[('comment', ('facade', 900))]
    assert restored['central'] == 'missing'
    # A foreign key compares as the identity both sides know, not a local id.
    assert restored['facade']['post_id'] == ['central', c_post]
    assert report['bytes'] > 0 and report['requests'] > 0

    repaired = central.pcommunicate('--repair', '--json')
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    data = json.loads(repaired.stdout)
    assert data['equal'] and data['repair']['found'] == 5
    result, report = verify(central)
    assert result.returncode == 0 and report['equal'], report
    # --prefer defaults to central: its hand edit won; the facade's tag
    # label, of the same version, was overwritten by central's.
    assert facade.side.rows('posts')[0]['title'] == 'edited by hand'
    assert {r['name']: r['label'] for r in facade.side.rows('tags')}['f0'] == 'facade 0'
    assert central.side.count('comments', "body = 'restored'") == 1
    status = central.sync('--status')
    assert 'last repair' in status and 'last verify' in status
