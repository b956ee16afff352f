"""Text that came from elsewhere (the peer, or a database row it wrote),
made safe to print on an operator's terminal.

A string with ESC in it can rewrite the terminal (move the cursor, hide
lines, set the title); a bidi override can make text read otherwise than
it is; a lone surrogate makes ``print`` raise.  :func:`printable` shows
all of them escaped, ``\\x1b`` as the four characters ``\\x1b``, and cuts
the text to a length that fits a line.
"""
from __future__ import annotations

import unicodedata

#: Characters shown as escapes: control (C0, DEL, C1), format (bidi
#: overrides and isolates, zero-width marks), surrogates, private use,
#: unassigned, and the line and paragraph separators.
_ESCAPED_CATEGORIES = frozenset({'Cc', 'Cf', 'Cs', 'Co', 'Cn', 'Zl', 'Zp'})
#: What a cut text ends with.
CUT = '...'


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f'\\x{code:02x}'
    if code < 0x10000:
        return f'\\u{code:04x}'
    return f'\\U{code:08x}'


def printable(value: object, width: int = 200) -> str:
    """``value`` as one line of at most about ``width`` characters of text
    (an escape counts as one), nothing a terminal acts on.  A value that is
    not a string (a peer may send anything) shows as its type's name rather
    than its possibly huge repr; None as the empty string."""
    if value is None:
        return ''
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return f'<{type(value).__name__}>'
    try:
        text = value if isinstance(value, str) else repr(value)
    except ValueError:  # an int of more digits than Python converts
        return f'<{type(value).__name__}>'
    cut = len(text) > width
    text = text[:width]
    if text.isascii() and text.isprintable():
        shown = text
    else:
        shown = ''.join(_escape(char) if unicodedata.category(char) in _ESCAPED_CATEGORIES
                        else char for char in text)
    return shown + CUT if cut else shown
