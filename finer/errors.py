"""The one error type users see: a problem they can fix, told in one line."""


class FinerError(Exception):
    """An error the user can fix: the CLI prints its one-line message and exits with status 2."""


def one_line(err: BaseException, limit: int = 200) -> str:
    """A library error's message on one line, cut to `limit` characters, for a `FinerError` to quote."""
    return " ".join(str(err).split())[:limit] or type(err).__name__
