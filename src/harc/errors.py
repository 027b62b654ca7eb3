"""The one exception type users see: the CLI prints its message as a single line."""


class HarcError(Exception):
    """A failure caused by input or environment, with a message that says what to do."""
