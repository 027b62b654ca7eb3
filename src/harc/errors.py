"""The exceptions users see: the CLI prints the message as a single line and exits with the code.

Exit codes of the `harc` program (docs/cli.md): 0 success, 1 a failure caused by input or
environment (`HarcError`, an unreadable or full output folder, ...), 2 a usage error (a bad
command line: `UsageError`), 130 interrupted (Ctrl-C).
"""


class HarcError(Exception):
    """A failure caused by input or environment, with a message that says what to do."""

    exit_code = 1


class UsageError(HarcError):
    """A command line that cannot work as given (a bad option value, a missing option)."""

    exit_code = 2
