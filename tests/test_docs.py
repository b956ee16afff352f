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
