"""The add-on's Alembic revisions: an independent branch, labelled
``communicator``, that a host app's Alembic environment includes.

In the host's Alembic configuration (``alembic.ini``, or the ``[alembic]``
section of a cookiecutter app's ``development.ini``)::

    version_locations = %(here)s/myapp/alembic/versions pyramid_communicator:migrations
    path_separator = space

(``path_separator = os`` would split ``pyramid_communicator:migrations`` at
its colon), and in the host's ``env.py``::

    target_metadata = [Base.metadata, pyramid_communicator.models.metadata]

``alembic upgrade heads`` (plural: two branches) then creates or upgrades
our tables beside the host's.  Our revisions own our tables: every change
of :mod:`pyramid_communicator.models` comes with a new revision here, so
a host's autogenerate (which Alembic runs only against a database at all
heads) finds nothing to write about them.  An ``env.py`` that does not
list our metadata would autogenerate ``drop_table`` for each of them;
passing :func:`include_object` to ``context.configure`` keeps
autogenerate and ``alembic check`` away from them instead.

A database whose tables ``metadata.create_all`` made under 0.1.0 is taken
over by ``alembic upgrade heads``; one made under 0.2.0 is already
current: ``alembic stamp communicator@head``.

This module imports neither Alembic nor anything that needs it: the
add-on itself runs without Alembic installed.
"""
from __future__ import annotations

from typing import Any

from ..models import metadata

#: The version location a host adds to its Alembic configuration.
VERSION_LOCATION = 'pyramid_communicator:migrations'
#: The branch label of our revisions: ``alembic upgrade communicator@head``,
#: ``alembic stamp communicator@head``, ``alembic downgrade communicator@base``.
BRANCH = 'communicator'
#: The tables our revisions own.
TABLES = frozenset(metadata.tables)


def include_object(obj: Any, name: str | None, type_: str, reflected: bool,
                   compare_to: Any) -> bool:
    """An ``include_object`` hook for a host's ``env.py`` that keeps the
    host's autogenerate away from our tables (and their columns, indexes
    and constraints): our revisions create and change them, a host
    revision must not.  Combine it with a hook of the host's own by
    calling both."""
    table = obj if type_ == 'table' else getattr(obj, 'table', None)
    table_name = getattr(table, 'name', name if type_ == 'table' else None)
    return table_name not in TABLES
