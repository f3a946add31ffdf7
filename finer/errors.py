"""The one error type users see: a problem they can fix, told in one line."""


class FinerError(Exception):
    """An error the user can fix: the CLI prints its one-line message and exits with status 2."""
