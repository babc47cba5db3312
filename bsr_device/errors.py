"""The one exception type for bad input, shared by `bsr_device` and `bsr` (`bsr.errors` re-exports it).

Every `BSRError` carries a single-line message naming the problem and the fix; both command lines print it without a
traceback and exit 2.
"""


class BSRError(ValueError):
    """Bad input to `bsr` or `bsr_device`: the message says what is wrong and how to fix it."""
