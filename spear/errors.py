"""User-facing errors.

A ``SpearError`` is bad input or an unusable environment, not a bug: the entry points print
its message as one line (problem and fix) and exit non-zero, without a traceback.
"""


class SpearError(Exception):
    """An error the user can fix; the message names the problem and the fix."""
