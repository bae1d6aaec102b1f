"""Errors a user can fix (a bad checkpoint, an output directory, sizes the data cannot feed):
the command-line tools print them as one line, without a traceback."""


class RunError(Exception):
    pass
