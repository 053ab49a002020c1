"""Exceptions that the command line turns into a message and an exit code.

Every error a user can fix (a bad file, a wrong key, a corrupted shard) is an `InputError`: the
message names the file, record, line or key and says what to do, and the process exits with 2.
"""

from __future__ import annotations


class BiomaskError(Exception):
    """Base class; the CLI prints the message (no traceback) and exits with `exit_code`."""

    exit_code = 1


class InputError(BiomaskError):
    """Bad input the user can fix: a file, record, line or config key. Exit code 2."""

    exit_code = 2


class ConfigError(InputError):
    """A config file or command-line override that does not match the stage's schema."""


class IntegrityError(InputError):
    """A file whose checksum does not match what its manifest or registry entry records."""


class OutputExistsError(InputError):
    """The output directory holds results this run would replace; pass --overwrite to replace them."""


class FetchError(BiomaskError):
    """A data source could not be reached (network, mirror, missing tool). Exit code 3."""

    exit_code = 3
