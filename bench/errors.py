"""The two kinds of failure a user sees, and their exit codes (0 ok, 1 internal error, 2 bad input)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_REGRESSION = 3


class BenchError(Exception):
    """Bad input the user can fix: printed as one line, exit code 2, no traceback."""

    exit_code = EXIT_BAD_INPUT


class UnknownName(BenchError, KeyError):
    """A registry lookup failed; the message carries the 'did you mean' suggestion."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
