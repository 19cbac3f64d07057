"""The exceptions of kvtier's public API.

Expected conditions (a miss, a corrupt chunk, a full queue) are not exceptions:
they come back as typed results and counters. Exceptions are for misuse
(``ValueError``/``ConfigError``) and for failures the caller must act on.
"""


class KvtierError(Exception):
    """Base class of every exception kvtier raises on purpose."""


class ConfigError(KvtierError, ValueError):
    """A configuration value, file or flag is invalid; the message says which and why."""


class ModelError(KvtierError):
    """A model could not be found, converted or loaded."""


class UnsupportedModelError(ModelError, ValueError):
    """A model of a family or attention kind kvtier cannot cache exactly; the message names the reason."""


class PinLimitError(KvtierError, ValueError):
    """A pin would take a tenant past its pinned-bytes cap (``pins.max_bytes_per_tenant``)."""


class ChunkFormatError(KvtierError):
    """Bytes that claim to be a chunk are not a valid chunk (bad magic, header, length or checksum)."""


class StorageError(KvtierError):
    """A tier cannot be opened at all (e.g. its folder is not a usable directory); the message says which and why."""


class ChunkVersionError(ChunkFormatError):
    """Bytes are a chunk in a format version (or with format flags) this kvtier does not read.

    Raised for chunks written by an older kvtier (format 1, the JSON header) or
    a newer one. A cache holds nothing that cannot be recomputed, so such a
    chunk is a miss, counted apart from corruption: no reader for old formats.
    """


class ChunkAuthError(ChunkFormatError):
    """A chunk read from a shared tier is not authenticated for this process (issue 15).

    It carries no valid MAC of its tenant's key (forged, written without the
    secret, or by another tenant), or it claims a namespace no engine of this
    process uses. A counted miss (``forged``), never decoded.
    """
