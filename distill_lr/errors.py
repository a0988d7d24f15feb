class UserInputError(Exception):
    """A problem with the user's input; the message names it and the fix."""
