"""Errors that mean "the input is wrong" rather than "the engine is broken".

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class UserInputError(ValueError):
    """Bad arguments: the message says what was wrong and what to do instead."""


class ModelFolderError(UserInputError):
    """A model folder that is missing, incomplete or unreadable; the message names the file."""


class NonFiniteError(UserInputError):
    """The denoiser produced inf/NaN latents: the chosen dtype is too narrow for this model.

    A choice the user can change (a wider --dtype), so it is reported like bad input: one line,
    and no image rather than a black or noisy one.
    """


class GenerationCancelled(Exception):
    """A generation was cancelled by its observer (pipelines.observe); no image was made.

    Not a UserInputError: nothing about the input was wrong. The message says after how many steps
    it stopped.
    """
