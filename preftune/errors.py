"""The one error type for everything a user can get wrong.

Every mistake a user can make (a config key, a data file, a model folder, a run directory, a
resume target, training that diverged) raises a subclass of `UserError`. The CLI prints it as
one line, `preftune: error: <what>, <where>; <what to do>`, and exits 2, with no traceback.
Anything else that escapes is a bug in preftune and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what, where, and what to do."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """A config key or value that cannot work; raised before any model loads."""
