"""User-facing errors. Every message is one line naming the file (or value) and what is wrong.

The CLI turns any :class:`MedsegError` into exit code 2 without a traceback (``--debug`` shows it).
"""

from __future__ import annotations


class MedsegError(Exception):
    """Base class of all errors caused by user input (files, plans, arguments)."""


class DatasetError(MedsegError):
    """A dataset file or layout is unreadable or inconsistent."""


class PlanError(MedsegError):
    """A plan cannot be derived, read or applied."""


class CheckpointError(MedsegError):
    """A run directory or checkpoint is missing or incompatible."""
