"""tfcbir's shared core: the version and the one exception type for the user's mistakes.

Every layer raises :class:`UserError` for input the user can fix (a bad config value, a missing
image, a gallery made by another model). Each CLI catches it once in ``main`` and prints it as one
line on stderr with exit code 2; anything else is a bug and keeps its traceback.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A mistake the user can fix. The message is one line: what is wrong, where, and the fix."""
