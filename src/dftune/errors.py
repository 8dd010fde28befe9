"""The one base class for errors a user can cause and fix (bad settings, input files, run
folders): the command line prints them as one line and exits with status 2, no traceback.
Set DFTUNE_DEBUG=1 to see the traceback anyway."""


class UserError(Exception):
    """Bad input, settings or files, explained in the message."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run, with what continuing needs: ``resume`` is the checkpoint a rerun
    with --resume starts from (None: none was saved). The command line prints it with the
    command that continues."""

    def __init__(self, message: str, resume=None):
        super().__init__(message)
        self.message, self.resume = message, resume
