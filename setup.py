import os

from setuptools import find_packages, setup

here = os.path.abspath(os.path.dirname(__file__))
with open(os.path.join(here, 'README.md'), encoding='utf-8') as f:
    README = f.read()
with open(os.path.join(here, 'CHANGES.rst'), encoding='utf-8') as f:
    CHANGES = f.read()

requires = [
    'pyramid >= 2.0',
    'SQLAlchemy >= 2.0',
    'zope.sqlalchemy >= 3.0',
    'transaction >= 3.0',
    'requests >= 2.28',
    'tqdm >= 4.60',
]

demo_require = [
    'pyramid_tm >= 2.5',
    'waitress >= 2.1',
]

#: The add-on's Alembic revisions (``pyramid_communicator:migrations``) run
#: in the host's Alembic environment; the add-on itself never imports it.
migrations_require = [
    'alembic >= 1.13',
]

tests_require = demo_require + migrations_require + [
    'WebTest >= 3.0',
    'pytest >= 7.4',
    'pytest-xdist >= 3.5',
    'psycopg[binary] >= 3.1',
    'PyMySQL >= 1.1',
    'gunicorn >= 21',
    'ruff',
]

# Sphinx brings its default theme (alabaster); nothing else is needed.
docs_require = [
    'Sphinx >= 7.4',
]

setup(
    name='pyramid_communicator',
    version='0.2.0.dev0',
    description='Keep database records of two Pyramid apps in sync through '
                'local inbound/outbound queues',
    long_description=README + '\n\n' + CHANGES,
    long_description_content_type='text/markdown',
    classifiers=[
        'Programming Language :: Python :: 3.11',
        'Framework :: Pyramid',
        'Topic :: Database',
    ],
    keywords='pyramid sqlalchemy sync outbox queue web',
    packages=find_packages(include=['pyramid_communicator', 'pyramid_communicator.*']),
    include_package_data=True,
    zip_safe=False,
    python_requires='>=3.11',
    install_requires=requires,
    extras_require={
        'demo': demo_require,
        'docs': docs_require,
        'migrations': migrations_require,
        'testing': tests_require,
    },
    entry_points={
        'console_scripts': [
            'pcommunicate = pyramid_communicator.scripts.pcommunicate:console',
        ],
        'paste.app_factory': [
            'demo = pyramid_communicator.demo:main',
        ],
    },
)
