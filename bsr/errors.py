"""The one exception type that `bsr` raises for bad input.

Every `BSRError` carries a single-line message naming the problem and the fix; the command line prints it without a
traceback and exits non-zero. It is defined in the torch-free `bsr_device` package (the on-device trainer raises it
too) and is the same class here.
"""

from bsr_device.errors import BSRError

__all__ = ["BSRError"]
