"""The one exception type users see: a message naming the file, row or parameter, and what to do."""


class CXRError(Exception):
    """A problem the user can fix (bad data, missing weights, bad parameter).

    The command line prints its message without a traceback.
    """
