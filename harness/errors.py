"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class HarnessError(Exception):
    """A problem the user can fix (bad input, missing data, bad option); never a bug."""


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its type's name when it has none)."""
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
