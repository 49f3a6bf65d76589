"""What the three command lines do with an exception nobody expected (pipx's habit): the
operator still gets one line, and the traceback is never lost: printed with ``--debug``,
otherwise kept in a private file that the line names."""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable

EXIT_FAILED = 1


def report_unexpected(
    prog: str, exc: BaseException, *, debug: bool, redact: Callable[[str], str] = lambda text: text
) -> int:
    """One stderr line for `exc`, its traceback on stderr (`debug`) or in a new 0600 file
    under the temporary directory; returns exit status 1. `redact` cleans both texts."""
    text = redact("".join(traceback.format_exception(exc)))
    where = "above"
    if debug:
        sys.stderr.write(text)
    else:
        try:
            fd, path = tempfile.mkstemp(prefix=f"{prog}-traceback-", suffix=".txt")  # mode 0600
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            where = f"in {path}"
        except OSError:  # nowhere to keep it: show it rather than lose it
            sys.stderr.write(text)
    message = redact(" ".join(f"{type(exc).__name__}: {exc}".split()))
    print(f"{prog}: internal error: {message} (traceback {where})", file=sys.stderr, flush=True)
    return EXIT_FAILED
