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
