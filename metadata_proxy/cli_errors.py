"""What the three command lines do with an exception nobody expected (pipx's habit): the
operator still gets one line, and the traceback is never lost: printed with ``--debug``,
otherwise kept in a private file that the line names."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import traceback

EXIT_FAILED = 1
# A JWT (a runtime token): three base64url parts, the header's starting `{"` encoded as `eyJ`.
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def redact_tokens(text: str) -> str:
    """`text` with anything shaped like a JWT replaced: a token that reached an exception's
    message (a pasted value, a header echoed in an error) must not reach a terminal or the journal."""
    return JWT_SHAPE.sub("<token redacted>", text)


def report_unexpected(prog: str, exc: BaseException, *, debug: bool) -> int:
    """One stderr line for `exc`, its traceback on stderr (`debug`) or in a new 0600 file
    under the temporary directory; returns exit status 1. Both texts pass `redact_tokens`."""
    redact = redact_tokens
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
