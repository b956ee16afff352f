"""Reference tables written from the code at build time, so they cannot
drift from it: the ``communicator.*`` settings from
:data:`pyramid_communicator.settings.SETTINGS` and the options of
``pcommunicate`` from its argparse parser.

The functions returning reStructuredText need no Sphinx, so the tests can
compare what the docs show with the README.
"""
from __future__ import annotations

import argparse
import functools
import re
from typing import Any

from pyramid_communicator import settings as settings_module
from pyramid_communicator.scripts import pcommunicate


def _escape(text: str) -> str:
    """Plain text from the code, safe inside reStructuredText; option names
    (``--retry``) and setting keys shown as literals."""
    parts = re.split(r'((?<![\w-])--[\w-]+|\bcommunicator\.\w+)', text)
    out = []
    for index, part in enumerate(parts):
        if index % 2 == 0:
            out.append(re.sub(r'([\\`*|_])', r'\\\1', part))
            continue
        out.append(f'``{part}``')
        following = parts[index + 1] if index + 1 < len(parts) else ''
        if following and not following[0].isspace() and following[0] not in '.,:;!?)]}\'"-/':
            out.append('\\ ')  # "``--give-up``(-outbound)": an escaped space ends the literal
    return ''.join(out)


def default_text(setting: Any) -> str:
    """A default as the README's table writes it."""
    if setting.required:
        return 'required'
    if setting.default is None:
        return 'unset'
    if isinstance(setting.default, bool):
        return 'true' if setting.default else 'false'
    if isinstance(setting.default, float) and setting.default.is_integer():
        return str(int(setting.default))
    return str(setting.default)


def settings_rst() -> list[str]:
    lines = ['.. list-table::', '   :header-rows: 1', '   :widths: 25 15 60', '',
             '   * - setting', '     - default', '     - meaning']
    for setting in settings_module.SETTINGS:
        default = default_text(setting)
        shown = default if setting.required or setting.default is None else f'``{default}``'
        lines += [f'   * - ``{settings_module.PREFIX}{setting.key}``',
                  f'     - {shown}',
                  f'     - {_escape(setting.doc)}']
    return lines


def parser() -> argparse.ArgumentParser:
    built = pcommunicate.PCommunicateCommand.parser()
    # A fixed width: the usage line must not depend on the build's terminal.
    built.formatter_class = functools.partial(argparse.HelpFormatter, width=76)
    return built


def _option_text(action: argparse.Action) -> str:
    if not action.option_strings:
        return action.metavar or action.dest
    names = ', '.join(action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    if action.nargs == '*':
        return f'{names} [{metavar} ...]'
    if action.nargs == '+':
        return f'{names} {metavar} [{metavar} ...]'
    return f'{names} {metavar}'


def pcommunicate_rst() -> list[str]:
    built = parser()
    lines = ['.. code-block:: text', '']
    lines += ['   ' + line for line in built.format_usage().rstrip().splitlines()]
    for group in built._mutually_exclusive_groups:
        names = ', '.join(f'``{action.option_strings[-1]}``'
                          for action in group._group_actions)
        lines += ['', f'One run does one of {names} at most; without any of them it '
                      'pushes, pulls and applies.']
    lines += ['', '.. list-table::', '   :header-rows: 1', '   :widths: 35 65', '',
              '   * - argument', '     - meaning']
    for action in built._actions:
        lines += [f'   * - ``{_option_text(action)}``', f'     - {_escape(action.help or "")}']
    return lines


def setup(app: Any) -> dict[str, Any]:
    from sphinx.util.docutils import SphinxDirective

    class Generated(SphinxDirective):
        has_content = False
        render = staticmethod(lambda: [])
        sources: tuple[str, ...] = ()

        def run(self):
            for source in self.sources:
                self.env.note_dependency(source)
            return self.parse_text_to_nodes('\n'.join(self.render()))

    class SettingsReference(Generated):
        render = staticmethod(settings_rst)
        sources = (settings_module.__file__,)

    class PcommunicateReference(Generated):
        render = staticmethod(pcommunicate_rst)
        sources = (pcommunicate.__file__,)

    app.add_directive('communicator-settings', SettingsReference)
    app.add_directive('pcommunicate-options', PcommunicateReference)
    return {'version': '1', 'parallel_read_safe': True, 'parallel_write_safe': True}
