"""Exception types shared by every keras-hps component.

Each carries a message that names what was wrong and where (key, file, model, table).
The model server maps them to TF Serving's status codes: `InvalidInputError` and
`ConfigError` -> INVALID_ARGUMENT (HTTP 400), `NotFoundError` -> NOT_FOUND (HTTP 404),
`UnavailableError` -> UNAVAILABLE (HTTP 503).
"""

from __future__ import annotations


class HPSError(Exception):
    """Base class of every error keras-hps raises on purpose."""


class ConfigError(HPSError, ValueError):
    """A parameter-server config (`hps.json`) or model-server config is invalid."""


class TableFormatError(HPSError, ValueError):
    """A table file (HPS directory or HDF5) is missing, malformed or inconsistent."""


class InvalidInputError(HPSError, ValueError):
    """A lookup or predict request carries bad input: float keys, out-of-range keys,
    a batch beyond the configured maximum, a wrong dtype, shape or a missing input."""


class NotFoundError(HPSError, LookupError):
    """An unknown model, table, version, label or signature."""


class UsageError(HPSError):
    """A command line that cannot work: flags that are missing or contradict each other.
    `keras-hps` reports it like an argparse error (exit status 2)."""


class UnavailableError(HPSError, ConnectionError):
    """A tier that lookups or updates need cannot answer now: a Redis Cluster node is dead or
    unreachable, the cluster is down, or a partition lost its rows. Nothing wrong was served;
    retrying later may succeed."""
