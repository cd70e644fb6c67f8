"""Text that came from somewhere else, shown as data.

vmrun runs as root in root's terminal, and prints what QEMU answered over QMP, what a guest
wrote on its console, what /proc says of another user's process and what an image header
holds. Any of these may be written by someone who wants root's terminal to act on it: an
escape sequence sets the title, erases a line or overwrites what vmrun said; a bidi
control reorders what follows; a newline starts a line that looks like vmrun's own. So such
text is shown with those characters as visible escapes (\\x1b, \\u202e), and only vmrun's
own line breaks stay line breaks.
"""

from __future__ import annotations

import re

# C0 controls, DEL, C1 controls; the Unicode line and paragraph separators; the marks and
# embeddings that reorder text (bidi) and the invisible ones that hide it.
OTHERS = "\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff"
UNSAFE_RE = re.compile(f"[\x00-\x1f{OTHERS}]")
UNSAFE_BUT_LINES_RE = re.compile(f"[\x00-\x08\x0b-\x1f{OTHERS}]")  # tab and newline kept


def escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """`text` on one line, every control or reordering character a visible escape."""
    return UNSAFE_RE.sub(lambda m: escape(m.group()), text)


def printable_lines(text: str) -> str:
    """`text` as printable, but its newlines and tabs kept: for vmrun's own messages, which
    span lines, after any foreign text in them went through `printable`."""
    return UNSAFE_BUT_LINES_RE.sub(lambda m: escape(m.group()), text)
