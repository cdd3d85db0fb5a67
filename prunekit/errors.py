"""User-facing errors.

A :class:`PrunekitError` describes a problem with the user's input (a file, a
flag, a config value).  Its message is one clear sentence; the command line
prints it without a traceback and exits with code 2.
"""

from __future__ import annotations

__all__ = ["PrunekitError", "PrunekitWarning", "UsageError"]


class PrunekitError(Exception):
    """A user-facing problem with input; the message is one clear sentence."""

    exit_code = 2


class UsageError(PrunekitError):
    """A bad argument or option value (shape string, builder spec, kwargs)."""


class PrunekitWarning(UserWarning):
    """Work goes on, but the user should know (a module traced as an opaque leaf)."""
