"""The one exception type that carries a person-readable error up to the CLI."""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class LlmctlError(Exception):
    """An error meant for a person: the message names what is wrong and where.

    `kind` is a short machine-readable tag (shown in `--json` output) and
    `exit_code` follows DESIGN.md: 2 bad input found before work, 1 a failure
    while working, 3 a quality gate.
    """

    def __init__(self, message: str, *, kind: str = "bad_input", exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.message = message
        self.kind = kind
        self.exit_code = exit_code
