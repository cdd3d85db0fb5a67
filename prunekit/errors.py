"""User-facing errors.

A :class:`PrunekitError` describes a problem with the user's input (a file, a
flag, a config value, a function the user wrote).  Its message is one clear
sentence; the command line prints it without a traceback and exits with code 2.
Errors that name something carry it as a field (``path``, ``function``,
``key``), so a Python caller can act on it without parsing the sentence.
"""

from __future__ import annotations

__all__ = ["PrunekitError", "PrunekitWarning", "UsageError", "ArgumentError", "ResourceError", "UserFunctionError",
           "UnsafeInputError", "OutputPathError"]


class PrunekitError(Exception):
    """A user-facing problem with input; the message is one clear sentence."""

    exit_code = 2


class UsageError(PrunekitError):
    """A bad argument or option value (shape string, builder spec, kwargs)."""


class ArgumentError(UsageError, TypeError):
    """A public function's argument of the wrong kind (a TypeError too, as Python's own would be)."""


class ResourceError(PrunekitError):
    """The machine refused: memory, disk space, permissions, a read-only file system.

    ``path`` is the file that could not be written or read (or None), ``size``
    the number of bytes that could not be had (or None), ``reason`` the cause.
    """

    def __init__(self, message: str, path: str | None = None, size: int | None = None,
                 reason: str | None = None):
        super().__init__(message)
        self.path, self.size, self.reason = path, size, reason


class OutputPathError(PrunekitError):
    """An output path that would overwrite or delete an input, or cannot be a run directory."""

    def __init__(self, message: str, path: str | None = None, conflict: str | None = None):
        super().__init__(message)
        self.path, self.conflict = path, conflict


class UnsafeInputError(PrunekitError):
    """A file asks prunekit to run code the user did not name (a builder in a manifest)."""

    def __init__(self, message: str, path: str | None = None, name: str | None = None):
        super().__init__(message)
        self.path, self.name = path, name


class UserFunctionError(PrunekitError):
    """A function the user supplied (scorer, validate, data factory, fine-tune) raised or returned
    something unusable.

    ``function`` is its name, ``role`` what it is used for ("validate function"), ``problem`` what
    went wrong; the original exception, if any, is the ``__cause__`` (``--debug`` shows it).
    """

    def __init__(self, message: str, function: str, role: str, problem: str):
        super().__init__(message)
        self.function, self.role, self.problem = function, role, problem


class PrunekitWarning(UserWarning):
    """Work goes on, but the user should know (a module traced as an opaque leaf)."""
