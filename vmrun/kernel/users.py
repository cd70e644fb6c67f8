"""A user QEMU (or a helper) runs as: what the kernel switches to, as pwd and grp say.

Looked up by host/facts.py (lookup_user, user_by_uid); taken by the opener and the
privilege drop, which switch to it.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class User:
    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # every group the user is in: its own and those that list it
    home: str = "/"
