"""Errors a user can cause, each with a one-line message and a distinct CLI exit code.

The CLI prints `error: <message>` and exits with `exit_code`; no traceback unless --debug.
"""
from __future__ import annotations


class AttnoptError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in attnopt."""

    exit_code = 1


class InputNotFound(AttnoptError):
    exit_code = 3


class UnreadableModel(AttnoptError):
    """The file exists but is not a model we can read (truncated, wrong format, corrupt)."""

    exit_code = 4


class UnsupportedModel(AttnoptError):
    """A model we can read but cannot handle (e.g. an op set we do not translate)."""

    exit_code = 5


class OutputError(AttnoptError):
    """The output path cannot be written (missing or read-only directory, equals input)."""

    exit_code = 6


class ValidationFailed(AttnoptError):
    exit_code = 7


class Interrupted(AttnoptError):
    exit_code = 130


class BadArgument(AttnoptError):
    """An option or input value out of its allowed set or range (a bad plan field, say)."""

    exit_code = 2
