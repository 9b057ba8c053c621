"""The one exception type for mistakes a user can fix (bad config, missing file, wrong run directory).

The CLI prints a :class:`UserError` as a single ``icot <command>: error: ...`` line and exits 2; every
other exception keeps its traceback, because it is a bug (ours, or a library's) that needs one.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for, with a message that names the file, line or key to fix.

    A ``ValueError`` so that research code catching ``ValueError`` around configuration keeps working.
    """


class UserPathError(UserError, OSError):
    """A path the user named cannot be used (missing, not a run directory, not writable, locked); also an
    ``OSError`` (and, raised as :class:`MissingPathError`, a ``FileNotFoundError``) for callers that
    catch those."""


class MissingPathError(UserPathError, FileNotFoundError):
    """A file or directory the user named does not exist."""
