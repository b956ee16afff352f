"""A small host app, wired the way the add-on expects: the demo of the
README and the app the end-to-end tests run on both sides."""
from pyramid.config import Configurator
from pyramid.settings import asbool


def main(global_config, **settings):
    with Configurator(settings=settings) as config:
        config.include('.models')
        config.include('pyramid_communicator')
        config.add_route('demo.posts', '/posts')
        config.add_route('demo.post', '/posts/{id:\\d+}')
        config.add_route('demo.comments', '/comments')
        config.add_route('demo.tags', '/tags')
        config.add_route('demo.tag', '/tags/{id:\\d+}')
        config.add_route('demo.notes', '/notes')
        config.add_route('demo.note', '/notes/{id}')
        config.add_route('demo.contact', '/contact')
        config.scan('.views')
        config.scan('.handlers')
        if asbool(settings.get('demo.create_tables', False)):
            create_tables(config.registry['dbsession_factory'].kw['bind'])
    return config.make_wsgi_app()


def create_tables(engine) -> None:
    """The demo's shortcut; a real app runs its migrations instead."""
    from pyramid_communicator.models import metadata

    from .models import Base
    Base.metadata.create_all(engine)
    metadata.create_all(engine)
