"""One exception hierarchy for everything hpsearch reports to a user.

The CLI catches :class:`HpsearchError`, prints its message and exits with code 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations


class HpsearchError(Exception):
    """A problem the user can fix: bad input, missing files, an unreachable service."""


class JobError(HpsearchError):
    """A job file that cannot be run. Carries every problem found, not just the first."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"{source}: {len(self.problems)} {noun}:\n{lines}")


class DataError(HpsearchError):
    """A data set that is missing, cannot be downloaded, or is corrupt."""


class StorageError(HpsearchError):
    """A storage folder or tracking store that cannot be used."""


class SearchError(HpsearchError):
    """A search that cannot start or be resumed as asked."""


class ModelError(HpsearchError):
    """A model that cannot be built as asked (e.g. pretrained weights that cannot be found)."""


class EntryPointError(HpsearchError):
    """The user's own code (a factory the job names) cannot be found, imported or called, or
    returns what hpsearch cannot use. Shows the user's own traceback, not hpsearch's."""

    def __init__(self, message: str, user_traceback: str | None = None) -> None:
        self.message, self.user_traceback = message, user_traceback
        super().__init__(message if not user_traceback else f"{message}\n{user_traceback}")
