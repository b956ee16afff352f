"""Sphinx configuration for the pyramid_communicator documentation.

Build: ``.venv/bin/pip install -e ".[docs]"`` then
``.venv/bin/sphinx-build -W --keep-going -b html docs docs/_build/html``.
"""
import sys
from importlib.metadata import version as _version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / '_ext'))

project = 'pyramid_communicator'
author = 'the pyramid_communicator developers'
copyright = '2026, ' + author
release = _version('pyramid_communicator')
version = '.'.join(release.split('.')[:2])

extensions = [
    'sphinx.ext.autodoc',
    'communicator_reference',  # settings and pcommunicate tables from the code
]

exclude_patterns = ['_build']
templates_path = []
html_theme = 'alabaster'
html_theme_options = {'description': 'Keep two Pyramid apps in sync', 'fixed_sidebar': True}

# Quotes and ellipses only: "--retry" must not become an en dash.
smartquotes_action = 'qe'

autodoc_member_order = 'bysource'
autodoc_typehints = 'signature'
