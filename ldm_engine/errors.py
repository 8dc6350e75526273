"""Errors that mean "the input is wrong" rather than "the engine is broken".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad arguments: the message says what was wrong and what to do instead."""


class ModelFolderError(UserInputError):
    """A model folder that is missing, incomplete or unreadable; the message names the file."""
