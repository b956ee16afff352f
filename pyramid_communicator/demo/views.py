"""Plain JSON views to create, change and list records in the demo.

They are the demo's, not the add-on's: no authentication, no CSRF, for
localhost only.
"""
from __future__ import annotations

import datetime
import uuid

from pyramid.httpexceptions import HTTPNotFound
from pyramid.view import view_config
from sqlalchemy import select

from pyramid_communicator import publish, send

from .models import Comment, ContactRequest, Note, Post, Tag


def _post_json(post: Post) -> dict:
    return {'id': post.id, 'title': post.title, 'body': post.body, 'slug': post.slug,
            'tags': [tag.name for tag in post.tags]}


def _apply_fields(post: Post, data: dict) -> None:
    for key in ('title', 'body', 'slug'):
        if key in data:
            setattr(post, key, data[key])
    if data.get('published_on'):
        post.published_on = datetime.datetime.fromisoformat(data['published_on'])


@view_config(route_name='demo.posts', request_method='GET', renderer='json')
def list_posts(request):
    posts = request.dbsession.query(Post).order_by(Post.id)
    comments = request.dbsession.query(Comment).order_by(Comment.id)
    return {
        'posts': [_post_json(p) for p in posts],
        'comments': [{'id': c.id, 'post_id': c.post_id, 'title': c.title, 'body': c.body}
                     for c in comments],
    }


def _save(request, post: Post) -> dict:
    """Write the post's fields and, unless asked not to, publish it in the
    same transaction."""
    _apply_fields(post, request.json_body)
    if 'tags' in request.json_body:  # the names of all its tags
        names = request.json_body['tags']
        post.tags = list(request.dbsession.scalars(
            select(Tag).where(Tag.name.in_(names)).order_by(Tag.name))) if names else []
    request.dbsession.add(post)
    request.dbsession.flush()
    if request.json_body.get('publish', True):
        publish(request.dbsession, post)
    return _post_json(post)


@view_config(route_name='demo.posts', request_method='POST', renderer='json')
def create_post(request):
    return _save(request, Post())


@view_config(route_name='demo.post', request_method='POST', renderer='json')
def update_post(request):
    post = request.dbsession.get(Post, int(request.matchdict['id']))
    if post is None:
        raise HTTPNotFound()
    return _save(request, post)


@view_config(route_name='demo.comments', request_method='POST', renderer='json')
def create_comment(request):
    data = request.json_body
    comment = Comment(post_id=data.get('post_id'), title=data.get('title'),
                      body=data.get('body'))
    request.dbsession.add(comment)  # autopublished when flushed
    request.dbsession.flush()
    return {'id': comment.id}


TAG_FIELDS = ('name', 'label', 'color', 'weight')


def _tag_json(tag: Tag) -> dict:
    return {'id': tag.id, **{key: getattr(tag, key) for key in TAG_FIELDS}}


@view_config(route_name='demo.tags', request_method='GET', renderer='json')
def list_tags(request):
    return {'tags': [_tag_json(t) for t in request.dbsession.query(Tag).order_by(Tag.id)]}


@view_config(route_name='demo.tags', request_method='POST', renderer='json')
def create_tag(request):
    tag = Tag(**{key: request.json_body.get(key) for key in TAG_FIELDS})
    request.dbsession.add(tag)  # autopublished when flushed
    request.dbsession.flush()
    return _tag_json(tag)


def _tag(request) -> Tag:
    tag = request.dbsession.get(Tag, int(request.matchdict['id']))
    if tag is None:
        raise HTTPNotFound()
    return tag


def _edit(request, record: object, fields: tuple[str, ...]) -> None:
    """Set the fields the request's JSON names (an autopublished update)."""
    for key in fields:
        if key in request.json_body:
            setattr(record, key, request.json_body[key])
    request.dbsession.flush()


@view_config(route_name='demo.tag', request_method='POST', renderer='json')
def update_tag(request):
    tag = _tag(request)
    _edit(request, tag, TAG_FIELDS)
    return _tag_json(tag)


@view_config(route_name='demo.tag', request_method='DELETE', renderer='json')
def delete_tag(request):
    request.dbsession.delete(_tag(request))  # the delete is autopublished
    request.dbsession.flush()
    return {'deleted': True}


NOTE_FIELDS = ('title', 'body')


def _note_json(note: Note) -> dict:
    return {'id': str(note.id), **{key: getattr(note, key) for key in NOTE_FIELDS}}


@view_config(route_name='demo.notes', request_method='GET', renderer='json')
def list_notes(request):
    return {'notes': [_note_json(n) for n in request.dbsession.query(Note).order_by(Note.id)]}


@view_config(route_name='demo.notes', request_method='POST', renderer='json')
def create_note(request):
    """A new note; its UUID is made here unless the caller gives one."""
    data = request.json_body
    note = Note(id=uuid.UUID(data['id']) if data.get('id') else uuid.uuid4(),
                **{key: data.get(key) for key in NOTE_FIELDS})
    request.dbsession.add(note)  # autopublished when flushed
    request.dbsession.flush()
    return _note_json(note)


def _note(request) -> Note:
    try:
        key = uuid.UUID(request.matchdict['id'])
    except ValueError:
        raise HTTPNotFound() from None
    note = request.dbsession.get(Note, key)
    if note is None:
        raise HTTPNotFound()
    return note


@view_config(route_name='demo.note', request_method='POST', renderer='json')
def update_note(request):
    note = _note(request)
    _edit(request, note, NOTE_FIELDS)
    return _note_json(note)


@view_config(route_name='demo.note', request_method='DELETE', renderer='json')
def delete_note(request):
    request.dbsession.delete(_note(request))  # the delete is autopublished
    request.dbsession.flush()
    return {'deleted': True}


@view_config(route_name='demo.contact', request_method='POST', renderer='json')
def contact(request):
    """The facade's contact form: kept here, sent to central in this
    request's transaction (messages of one visitor in order: ``key``)."""
    data = request.json_body
    contact_request = ContactRequest(name=data['name'], email=data['email'],
                                     text=data['text'], status='sent')
    request.dbsession.add(contact_request)
    request.dbsession.flush()
    message_id = send(request, 'contact.submitted',
                      {'ref': contact_request.id, 'name': data['name'],
                       'email': data['email'], 'text': data['text']},
                      key=data['email'])
    return {'id': contact_request.id, 'message_id': message_id}


@view_config(route_name='demo.contact', request_method='GET', renderer='json')
def list_contact_requests(request):
    rows = request.dbsession.query(ContactRequest).order_by(ContactRequest.id)
    return {'contact_requests': [
        {'id': r.id, 'name': r.name, 'email': r.email, 'text': r.text, 'status': r.status,
         'origin': r.origin, 'message_id': r.message_id, 'ref': r.ref} for r in rows]}
