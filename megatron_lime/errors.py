"""Bad input: the one exception type for it, and the one way a command reports it.

Bad input is what a user handed a command that it cannot use, and that the user fixes, not us:
- a damaged, missing or malformed input file: a dataset's .bin/.idx, a checkpoint, a corpus line or
  row, a mixture, blend or results file;
- a bad flag value or config (a --filter that does not parse, an unknown dataset name);
- an output that cannot be written (a read-only or full disk: OutputWriteError, raised by the writers of
  megatron_lime/files.py; a folder that is not ours to replace).

Each is a LimeInputError, or one of the subclasses each package keeps for its own files
(CheckpointError, IndexedDatasetError, BadRecordError, ...), whose message is one line naming the
file (or flag) and the reason. A command prints it as that one line, `error: <message>` on stderr,
and exits 1, without a traceback: the traceback would point into our code while the fix is in the
input. Every other exception is a bug, ours or a library's, and keeps its traceback.
tools/*.py and the data commands report through `reports_input_errors`; training through
megatron_lime/training/failures.py, which prints `input_error_line` on the failing rank.

The ground floor: this module imports nothing from megatron_lime, so every layer can raise these.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

INPUT_ERROR_STATUS = 1


class LimeInputError(ValueError):
    """Input a command cannot use (see the module docstring); the message names the file and the reason.

    A ValueError, so that `except ValueError` written before this class existed still catches it.
    """


class MissingInputError(FileNotFoundError, LimeInputError):
    """A file or folder the user named does not exist (a FileNotFoundError too, as it was before)."""


class OutputWriteError(OSError, LimeInputError):
    """An output that could not be written (a read-only or full disk): names the output, not its temporary name,
    and the OS reason. An OSError too, with the OS error's errno."""

    def __init__(self, path: str, error: OSError):
        super().__init__(error.errno, f"{path}: cannot write: {error.strerror or error}")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def input_error_line(error: LimeInputError) -> str:
    """The one line a command prints for `error`: `error: <message>` (a multi-line message is joined with "; ")."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + ("; ".join(lines) or type(error).__name__)


def reports_input_errors(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Decorate a command's `main(argv) -> status`: a LimeInputError is printed as its one line and gives status 1.

    Anything else propagates with its traceback. A decorator rather than a wrapper in the
    `__main__` block, so that `main([...])` called in-process (tests, notebooks) returns the same status.
    """

    @functools.wraps(main)
    def reporting_main(argv: list[str] | None = None) -> int:
        try:
            return main(argv)
        except LimeInputError as error:
            print(input_error_line(error), file=sys.stderr, flush=True)
            return INPUT_ERROR_STATUS

    return reporting_main
