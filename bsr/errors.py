"""The one exception type that `bsr` raises for bad input.

Every `BSRError` carries a single-line message naming the problem and the fix; the command line prints it without a
traceback and exits non-zero.
"""


class BSRError(ValueError):
    """Bad input to `bsr`: the message says what is wrong and how to fix it."""
