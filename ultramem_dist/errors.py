"""Typed exceptions of ultramem-dist.

Every error a store, shard server or client can raise derives from :class:`UltraMemError`.
Errors that cross the wire are mapped to gRPC status codes in exactly one place,
:mod:`ultramem_dist._private.status`.
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "ExportError",
    "ImportCheckpointError",
    "InvalidRequestError",
    "LookupProcessError",
    "ManifestError",
    "RemoteError",
    "ShardUnavailableError",
    "StoreError",
    "StorePathError",
    "TableNotFoundError",
    "UltraMemError",
    "VersionMismatchError",
]


class UltraMemError(Exception):
    """Base class of every ultramem-dist error."""


# --- value store -------------------------------------------------------------------------------


class StoreError(UltraMemError):
    """A value store on disk cannot be used."""


class ManifestError(StoreError):
    """``manifest.json`` is missing, unparsable, of an unknown schema or inconsistent."""


class ChecksumError(StoreError):
    """A store file is corrupt, truncated or does not match what the manifest records."""


class StorePathError(StoreError):
    """A path in the manifest (or a version id) would escape the store directory."""


class ExportError(UltraMemError):
    """Tables cannot be exported as requested (bad arguments or an unsupported model)."""


class ImportCheckpointError(UltraMemError):
    """An official UltraMem/UltraMemV2 state dict cannot be imported (unreadable file, or an
    unknown, missing or misshaped key: the message names it and the shape it should have)."""


# --- requests (raised by the shard, mapped to gRPC status codes) --------------------------------


class InvalidRequestError(UltraMemError):
    """A Gather request is malformed: wrong dtype/shape/length, ids out of range, limits..."""


class TableNotFoundError(UltraMemError):
    """The requested table id is not served by this shard."""


class VersionMismatchError(UltraMemError):
    """The requested table version is not the one served (or a reply came from another)."""


# --- client ------------------------------------------------------------------------------------


class ShardUnavailableError(UltraMemError):
    """A shard could not answer (down, overloaded or past the deadline); names the shard."""


class RemoteError(UltraMemError):
    """A shard answered with an unexpected error status or an inconsistent reply."""


class LookupProcessError(UltraMemError):
    """The lookup process that runs this process's gRPC client died, hung or was closed."""
