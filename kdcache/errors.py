"""The errors kdcache raises for bad input.

Every message names what the user typed (a flag, a spec, a path) and what was wrong with it, so the
CLI can print it as is, without a traceback. Anything that is not a ``KDCacheError`` is a bug.
"""

from __future__ import annotations


class KDCacheError(Exception):
    """Base class: a problem with the user's input, data or cache, explained in the message."""

    exit_code = 1


class ConfigError(KDCacheError, ValueError):
    """A flag or config-file value is invalid."""

    exit_code = 2


class SpecError(KDCacheError):
    """A ``--teacher``/``--student``/``--data`` spec cannot be resolved or has the wrong type."""

    exit_code = 2


class DataError(KDCacheError):
    """A dataset item has an unusable shape or type, or the dataset is empty."""


class ModelOutputError(KDCacheError):
    """A model (teacher or student) returned something that is not logits of the expected shape."""


class TeacherOutputError(ModelOutputError):
    """The teacher produced something that cannot be cached (wrong shape, NaN/Inf)."""


class NonFiniteLossError(KDCacheError):
    """The training loss became NaN or infinite: the run diverged."""


class StoreError(KDCacheError):
    """A path is not a usable kdcache store."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path exists but holds something other than a kdcache store, or nothing."""


class IncompleteStoreError(StoreError):
    """The store's status is ``writing``: a dump is running, crashed, or was interrupted."""


class FingerprintMismatchError(StoreError):
    """A cache's teacher, data or capture fingerprint differs from what the run uses."""


class StoreLockedError(StoreError):
    """Another live dump holds the store's write lock."""
