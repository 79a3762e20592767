"""The error type for problems with what the user gave (a file, a folder, a flag, a run folder), not bugs.

``fewstep`` prints one as a single ``error: ...`` line and exits 2; anything else is a bug and keeps its traceback.
It is a ValueError, so callers that already catch ValueError for bad options keep working.
"""


class UserError(ValueError):
    """A bad input, said in one line: what was expected and what was found."""
