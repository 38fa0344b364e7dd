"""Typed errors shared by every layer. Each carries a one-line message for the user."""


class EmbedpipeError(Exception):
    """Base class: ``str(err)`` is one line a user can act on."""

    exit_code = 1


class InputError(EmbedpipeError):
    """Bad usage or bad input (missing path, bad config key, unreadable layout). Exit code 2."""

    exit_code = 2


class DecodeError(EmbedpipeError):
    """One input could not be used as an image; the run quarantines it and goes on."""


class BackboneError(EmbedpipeError):
    """A backbone could not be built or its weights did not match the architecture."""

    exit_code = 2


class RunFailed(EmbedpipeError):
    """A stage failed; the run directory keeps what was finished so a re-run resumes."""


class WriteFailed(RunFailed):
    """An output could not be written (disk full, file too large, read-only or failing disk). The file
    it was replacing is untouched, so the same command resumes once the cause is fixed."""


class RunBusy(EmbedpipeError):
    """Another writer holds the run directory's lease (see ``storage.lease``). Exit code 2."""

    exit_code = 2


class LeaseLost(EmbedpipeError):
    """This writer stalled past the lease's stale time and another one took the run directory over."""
