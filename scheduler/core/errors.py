"""The one base class of every error a user or operator can cause and fix.

Its message is one line saying what was wrong and what to do; it never leaves
partial state behind. The CLI (``scheduler.cli.common.farm_command``) prints
any of them as one ``reelfarm: ...`` line and exits with ``exit_code``; the
HTTP front will map them to its error shape the same way. Each subclass also
keeps the builtin base it always had (``ValueError``, ``LookupError``, ...),
so code that caught those still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; ``str(error)`` says what and how."""

    exit_code = 2
