"""Exceptions that the command line turns into a message and an exit code.

Every error a user can fix (a bad file, a wrong key, a corrupted shard) is an `InputError`: the
message names the file, record, line or key and says what to do, and the process exits with 2.
"""

from __future__ import annotations

import resource  # here, not where it is needed: out of file descriptors, an import cannot open its module
import signal


class BiomaskError(Exception):
    """Base class; the CLI prints the message (no traceback) and exits with `exit_code`."""

    exit_code = 1


class InputError(BiomaskError, ValueError):
    """Bad input the user can fix: a file, record, line or config key. Exit code 2. A `ValueError`
    too, so a library caller's `except ValueError` (scanpy's convention for bad arguments) catches it."""

    exit_code = 2


class ConfigError(InputError):
    """A config file or command-line override that does not match the stage's schema."""


class IntegrityError(InputError):
    """A file whose checksum does not match what its manifest or registry entry records."""


def missing_input(path: object, what: str = "input") -> InputError:
    """`input PATH does not exist`, saying where a relative path was looked for: from the working
    directory, not from the config file's folder."""
    import os

    text = os.fspath(path)  # type: ignore[call-overload]
    where = (
        ""
        if os.path.isabs(os.path.expanduser(text))
        else f" (relative paths are read from the working directory, {os.getcwd()})"
    )
    return InputError(f"{what} {text} does not exist{where}")


class OutputExistsError(InputError):
    """The output directory holds results this run would replace; pass --overwrite to replace them."""


class StaleOutputError(OutputExistsError):
    """The output is biomask's own, of other settings or inputs: --overwrite replaces it (the pipeline
    runner does so by itself; any other refusal it reports as a failure)."""


class OutputBusyError(InputError):
    """Another live run (another process, notebook kernel or thread) is writing the same output: two
    would delete each other's files. Nothing was written; wait for it, stop it, or choose another output."""


# Exit code of a training stage that checkpointed on a scheduler's signal and asks to be requeued: the
# pipeline runner and the sbatch scripts rerun (requeue) it, and it resumes from the checkpoint.
REQUEUE_EXIT_CODE = 75


class Requeue(BiomaskError):
    """Training was checkpointed after a scheduler's signal or Ctrl-C; rerun the same command to resume. Exit code 75."""

    exit_code = REQUEUE_EXIT_CODE
    # Whether raising it ends the process: true in the `biomask` command (cli.entry sets it), which
    # exits 75 and so keeps the scheduler signals and SIGHUP ignored after the checkpoint; false where the
    # process goes on after the call (a notebook, a script calling fit_cells), which gets its handlers back.
    ends_process = False


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped training in a Python caller (a notebook, a script calling fit_cells or pretrain):
    checkpointed, and the same call resumes. A KeyboardInterrupt, as Jupyter's "Interrupt kernel"
    is: raised as `Requeue` (an Exception), a loop over samples with `except Exception` swallowed it
    and trained the next sample."""


# What schedulers send before they kill: SLURM --signal and LSF -wa (USR1 or USR2), SGE -notify
# (USR2 before its SIGKILL), a CPU-time limit (XCPU), PBS / HTCondor / Kubernetes (TERM). USR2 and
# XCPU ended a training run where it stood: no checkpoint, no message, the steps since the last
# checkpoint lost. Training checkpoints on each and exits 75; other commands stop as on SIGTERM.
SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGXCPU)


class Terminated(BaseException):
    """SIGTERM reached a command (`kill`, `timeout`, scancel, a pipeline runner passing a stop on) —
    or another scheduler's stop signal (SIGUSR1, SIGUSR2, SIGXCPU) outside training — raised where
    the command was, so the temporary output it was writing is removed as on Ctrl-C, rather than
    left beside the output (as large as the store or file it was becoming). Not an `Exception`: no
    handler for errors may take it for one. Exit code 143 (128 + SIGTERM) whichever signal it was:
    one code for "stopped, nothing half-written, run it again"."""

    exit_code = 143

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"


class FetchError(BiomaskError):
    """A data source could not be reached (network, mirror, missing tool). Exit code 3."""

    exit_code = 3


# errno values that mean "the file system refused": the user fixes them (space, permissions, path),
# so they are reported like bad input (exit 2) with the path, never as a traceback.
_ENVIRONMENT_ERRNOS = {"ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EBUSY", "EXDEV", "EISDIR", "ENOTDIR"}
_ENVIRONMENT_ERRNOS |= {"ENOENT", "ENAMETOOLONG", "EFBIG", "EMFILE", "ENFILE", "EIO"}


def is_environment_error(exc: BaseException) -> bool:
    """An OSError the file system raised (disk full, read-only, permission denied, no such path), or
    numpy's short write on a full disk ("N requested and M written"), as opposed to a bug."""
    import errno

    if not isinstance(exc, OSError):
        return False
    if exc.errno is not None:
        return errno.errorcode.get(exc.errno, "") in _ENVIRONMENT_ERRNOS
    return "requested and" in str(exc) and "written" in str(exc)


def first_line(exc: BaseException, default: str = "") -> str:
    """An exception's first non-empty line, stripped: a library's multi-line error quoted in a message."""
    return next((line.strip() for line in str(exc).splitlines() if line.strip()), default)


def numba_cache_error(exc: BaseException) -> str | None:
    """What to say of an OSError numba raised saving its compilation cache (a full or over-quota home
    under `~/.cache/numba`): its write carries no file name, so it read as the output's failure."""
    import os
    import traceback

    if not isinstance(exc, OSError) or exc.__traceback__ is None:
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    if not any(f"numba{os.sep}core{os.sep}caching" in frame.filename for frame in frames[-4:]):
        return None
    folder = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numba"
    )
    return (
        f"numba could not save its compiled code in its cache ({exc.filename or folder}: "
        f"{exc.strerror or exc}); free some space there, or set NUMBA_CACHE_DIR to a folder with room "
        "(e.g. export NUMBA_CACHE_DIR=$TMPDIR/numba) and run again"
    )


def describe_os_error(exc: OSError, where: str | None = None) -> str:
    """`cannot write PATH: No space left on device` with a hint; `where` names the path when the
    exception does not (numpy's short writes carry no file name)."""
    import errno

    numba = numba_cache_error(exc)
    if numba:
        return numba
    path = exc.filename if exc.filename is not None else where
    reason = exc.strerror or str(exc)
    code = errno.errorcode.get(exc.errno or -1, "")
    if code in ("ENOSPC", "EDQUOT", "EFBIG") or exc.errno is None:
        hint = "free some space (or choose an output on another file system) and run again"
        reason = reason if exc.errno is not None else f"short write ({reason}): the disk is probably full"
    elif code in ("EROFS", "EACCES", "EPERM"):
        hint = "check the permissions (or choose another path) and run again"
    elif code == "EBUSY":
        hint = "a mount point or a busy file cannot be replaced; choose a folder inside it"
    elif code in ("EMFILE", "ENFILE"):
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        hint = (
            f"this process may hold {limit} files open (`ulimit -n`), and a prep stage holds every input "
            "open while it reads them (an h5ad: 3 each): raise the limit (`ulimit -n 65536` before the "
            "command) or join the inputs into fewer files"
        )
    else:
        hint = "check the path and run again"
    target = f" {_as_named(path)}" if path is not None else ""
    extra = f" -> {_as_named(exc.filename2)}" if getattr(exc, "filename2", None) else ""
    return f"cannot use{target}{extra}: {reason}; {hint}"


def _as_named(path: object) -> str:
    """A path as the user knows it: biomask's temporary `.NAME.tmp-1a2b3c4d` (or `.old-`) beside NAME
    is named by NAME, in whose folder the refusal happened (the hidden name meant nothing to them)."""
    import re
    from pathlib import PurePath

    text = str(path)
    found = re.fullmatch(r"\.(.+)\.(tmp|old)-[0-9a-f]{8}", PurePath(text).name)
    if found is None:
        return text
    what = "its temporary" if found.group(2) == "tmp" else "its earlier copy, set aside as"
    return f"{PurePath(text).with_name(found.group(1))} ({what} {PurePath(text).name})"


class EnvironmentIOError(InputError):
    """The file system refused a read or write (disk full, read-only, permission denied). Exit code 2."""
