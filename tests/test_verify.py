"""``pcommunicate --verify`` and ``--repair`` against a real pair: drift
made by SQL run by hand on either side, found with the right exit status
and JSON, repaired through ordinary messages, and found in traffic that
grows with the differences, not with the table."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import select, text

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


@pytest.mark.slow
def test_equal_sides_verify_clean(synced_pair):
    central, facade = synced_pair
    result, report = verify(central)
    assert result.returncode == 0, result.stderr
    assert report['equal'] and report['differences'] == []
    assert report['names'] == ['comment', 'note', 'post', 'tag']
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


@pytest.mark.slow
def test_a_delete_that_never_arrived_is_sent_again(synced_pair):
    """Central deleted a tag, but its delete never reached the facade (the
    message lost by hand here): --verify finds it, --repair sends the
    delete again, stamped now, and the sides are equal."""
    central, facade = synced_pair
    with central.side.session() as session:
        tag = session.scalars(select(Tag).where(Tag.name == 'c1')).one()
        tag_id = tag.id
        session.delete(tag)  # autopublished: a delete message
    sql(central.side, 'DELETE FROM outbound_messages WHERE delivered_at IS NULL')

    result, report = verify(central)
    assert result.returncode == DIFFERENT, result.stderr
    [difference] = report['differences']
    assert difference['identity'] == ['central', tag_id]
    assert difference['central'] == 'missing' and difference['deleted_on'] == ['central']

    repaired = central.pcommunicate('--repair', '--json')
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)['equal']
    assert 'c1' not in {row['name'] for row in facade.side.rows('tags')}
    result, report = verify(central)
    assert result.returncode == 0 and report['equal'], report


@pytest.mark.slow
def test_a_delete_the_facade_made_is_sent_again_when_central_asks(synced_pair):
    central, facade = synced_pair
    with facade.side.session() as session:
        session.delete(session.scalars(select(Tag).where(Tag.name == 'f2')).one())
    sql(facade.side, 'DELETE FROM outbound_messages WHERE delivered_at IS NULL')
    assert 'f2' in {row['name'] for row in central.side.rows('tags')}

    repaired = central.pcommunicate('--repair', '--json')
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert json.loads(repaired.stdout)['equal']
    assert 'f2' not in {row['name'] for row in central.side.rows('tags')}


@pytest.mark.slow
def test_traffic_grows_with_differences_not_with_the_table(pair):
    central, facade = pair
    with central.side.session() as session:
        session.add_all(Tag(name=f'tag-{i}', label=f'Label {i}', color='red', weight=i % 100)
                        for i in range(2000))
    central.sync()
    assert facade.side.count('tags') == 2000
    ids = [row['id'] for row in facade.side.rows('tags')]
    sql(facade.side, *(f"UPDATE tags SET label = 'drift {i}' WHERE id = {i}"
                       for i in (ids[10], ids[999], ids[1990])))

    result, report = verify(central, 'tag')
    assert result.returncode == DIFFERENT, result.stderr
    assert len(report['differences']) == 3
    table = sum(len(json.dumps({'tag': {k: row[k] for k in ('name', 'label', 'color',
                                                                'weight')}}))
                for row in central.side.rows('tags'))
    # 3 differences among 2,000 records: a few leaves and the ranges above
    # them, not the table (about 100 KB of wire bodies).
    assert report['bytes'] * 10 < table, (report['bytes'], table)
    assert report['records'] <= 3 * 16


def test_verify_route_refuses_hostile_requests(webapp, make_side):
    from test_views import basic as auth
    app = webapp(make_side('facade'), **{'communicator.max_body_bytes': 1024 * 1024})
    url = '/verify.json'
    assert app.post(url, b'{}', status=401)
    bad = [b'[]', b'{"name": "nope", "op": "origins"}',
           b'{"name": "tag", "op": "drop"}',
           b'{"name": "tag", "op": "digests", "ranges": [["central", 5, 5]]}',
           b'{"name": "tag", "op": "digests", "ranges": [["central", 1, 9], ["central", 5, 20]]}',
           b'{"name": "tag", "op": "digests", "ranges": [["bad name!", 1, 2]]}',
           b'{"name": "tag", "op": "digests", "ranges": [["central", 1.5, 2]]}',
           b'{"name": "tag", "op": "digests", "ranges": [["central", true, 2]]}',
           b'{"name": "tag", "op": "republish", "identities": [["central"]]}',
           json.dumps({'name': 'tag', 'op': 'digests',
                       'ranges': [['central', i, i + 1] for i in range(257)]}).encode(),
           b'{"name": "tag", "op": "origins", "extra": 1}',
           # relink: a relationship the record has, and two identities
           b'{"name": "tag", "op": "relink", "links": [["tags", ["central", 1], ["c", 2]]]}',
           b'{"name": "tag", "op": "relink", "links": [["x", ["central", 1]]]}',
           b'{"name": "tag", "op": "relink", "links": {}}']
    for body in bad:
        response = app.post(url, body, headers=auth(), status=400)
        assert set(response.json) == {'error'}, body
    too_big = b'{"name": "tag", "op": "origins", "pad": "' + b'x' * 2_000_000 + b'"}'
    app.post(url, too_big, headers=auth(), status=413)
    app.get(url, headers=auth(), status=405)
    ok = app.post(url, b'{"name": "tag", "op": "origins"}', headers=auth(), status=200)
    assert ok.json == {'origins': {}}
