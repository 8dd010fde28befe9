"""The one base class for errors a user can cause and fix (bad settings, input files, run
folders): the command line prints them as one line and exits with status 2, no traceback.
Set DFTUNE_DEBUG=1 to see the traceback anyway."""


class UserError(Exception):
    """Bad input, settings or files, explained in the message."""
