"""The README documents every setting the add-on reads, with its default."""
import re
from pathlib import Path

from pyramid_communicator.settings import SETTINGS

README = (Path(__file__).parent.parent / 'README.md').read_text()


def test_every_setting_is_documented_with_its_default():
    rows = dict(re.findall(r'^\| `communicator\.(\w+)` \| ([^|]+) \|', README, re.M))
    assert sorted(rows) == sorted(s.key for s in SETTINGS)
    for setting in SETTINGS:
        documented = rows[setting.key].strip().strip('`')
        if setting.required:
            assert documented == 'required'
        elif setting.default is None:
            assert documented == 'unset'
        else:
            assert documented.lower() == str(setting.default).lower().removesuffix('.0')


def test_readme_starts_with_the_demo_and_the_test_commands():
    commands = re.findall(r'```sh\n(.+?)\n```', README)
    assert commands[0].endswith('.venv/bin/python -m pyramid_communicator.demo')
    assert commands[1].endswith('.venv/bin/pytest')


def test_readme_links_point_at_files_that_exist():
    """The README is the short doc: its links into docs/ must not break
    when pages move."""
    root = Path(__file__).parent.parent
    targets = re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', README)
    local = [target for target in targets if '://' not in target]
    assert any(target.startswith('docs/') for target in local)
    missing = [target for target in local if not (root / target).exists()]
    assert missing == []


def test_docs_settings_reference_shows_the_readme_defaults():
    """The docs' settings table is generated from SETTINGS at build time;
    it must show each default as the README's table does."""
    import sys
    sys.path.insert(0, str(Path(__file__).parent.parent / 'docs' / '_ext'))
    try:
        import communicator_reference
    finally:
        sys.path.pop(0)
    generated = '\n'.join(communicator_reference.settings_rst())
    readme = dict(re.findall(r'^\| `communicator\.(\w+)` \| ([^|]+) \|', README, re.M))
    for setting in SETTINGS:
        assert f'``communicator.{setting.key}``' in generated
        shown = communicator_reference.default_text(setting)
        assert shown == readme[setting.key].strip().strip('`')
