"""The error a user can act on, and the helpers that make one from a failed check or a library's exception."""


class UserInputError(Exception):
    """A problem with the user's input; the message names it and the fix."""


def check(ok: bool, message: str) -> None:
    """Raise ``UserInputError(message)`` unless ``ok``."""
    if not ok:
        raise UserInputError(message)


def first_line(err: BaseException, limit: int = 200) -> str:
    """The first line of an exception, short enough for a one-line error."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


ONE_LINE = (UserInputError, OSError)  # what a command reports in one line: bad input, and the system refusing a path of the user's


def error_line(err: BaseException) -> str:
    """The line a command prints for one of ``ONE_LINE``: the problem and where, never a traceback."""
    if isinstance(err, UserInputError):
        return f"error: {err}"
    assert isinstance(err, OSError)
    where = f" at {err.filename}" if err.filename else ""
    return f"error: {err.strerror or first_line(err)}{where}: check that path (it exists, is what was meant, can be written, has room)"
