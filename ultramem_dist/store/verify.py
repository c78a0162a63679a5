"""Verification cache: skip the full sha256 of a store file a restart has already verified.

A store version is immutable, so once a node has hashed a file, a restart may trust that
verdict while the file is provably the same file: the cache keeps, OUTSIDE the store, one
record per verified file with its identity (``st_dev``, ``st_ino``, ``st_size``,
``st_mtime_ns`` and ``st_ctime_ns``) and the manifest's sha256. A later load skips the hash
only if all of these match and the record can be trusted:

* the record file and its directory are owned by this process' user and not writable by
  group or others (a record another user could write proves nothing);
* the record is read through ``O_NOFOLLOW`` (no symlink planted in its place).

Writing to a file in place changes its mtime and ctime; restoring the mtime with ``utime``
still changes the ctime (which no unprivileged call can set), so a file changed after it was
verified misses the cache and is hashed again — and refused if it no longer matches.

Modes (``--verify``): ``always`` hashes every file on every load (use it in corruption tests
and when the store's filesystem is not trusted, e.g. writable by other users); ``cached`` (the
serve-shard default) hashes on a node's first load and on any identity change; ``never``
checks sizes only (fastest, trusts the store completely).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Literal

__all__ = ["VERIFY_MODES", "VerifyMode", "cache_dir", "is_verified", "record_verified"]

VerifyMode = Literal["always", "cached", "never"]
VERIFY_MODES: tuple[str, ...] = ("always", "cached", "never")
ENV_CACHE_DIR = "ULTRAMEM_VERIFY_CACHE"
_FIELDS = ("st_dev", "st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")


def cache_dir() -> Path:
    """``$ULTRAMEM_VERIFY_CACHE``, else ``$XDG_CACHE_HOME/ultramem/verified``, else
    ``~/.cache/ultramem/verified``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ultramem" / "verified"


def _identity(st: os.stat_result) -> dict[str, int]:
    return {k: int(getattr(st, k)) for k in _FIELDS}


def _record_path(path: Path, sha256: str) -> Path:
    key = hashlib.sha256(f"{os.path.realpath(path)}\0{sha256}".encode()).hexdigest()
    return cache_dir() / f"{key}.json"


def _trusted(st: os.stat_result) -> bool:
    return st.st_uid == os.getuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def is_verified(path: Path, sha256: str, st: os.stat_result) -> bool:
    """True when a trusted record says ``path`` (as ``st`` describes it now) hashed to
    ``sha256``. Any doubt (no record, foreign owner, loose permissions, other identity,
    unreadable JSON) is False: the caller hashes."""
    rec = _record_path(path, sha256)
    try:
        if not _trusted(os.stat(rec.parent)):
            return False
        fd = os.open(rec, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fst = os.fstat(fd)
        if not stat.S_ISREG(fst.st_mode) or not _trusted(fst) or fst.st_size > 4096:
            return False
        data = json.loads(os.read(fd, 4096))
    except (OSError, ValueError):
        return False
    finally:
        os.close(fd)
    return (
        isinstance(data, dict)
        and data.get("sha256") == sha256
        and data.get("path") == os.path.realpath(path)
        and data.get("identity") == _identity(st)
    )


def record_verified(path: Path, sha256: str, st: os.stat_result) -> None:
    """Remember that ``path`` (identity ``st``, taken before hashing) hashed to ``sha256``.

    Best effort: a cache that cannot be written only costs the next load a re-hash."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not _trusted(os.stat(d)):
            return
        body = json.dumps(
            {"path": os.path.realpath(path), "sha256": sha256, "identity": _identity(st)}
        )
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".rec-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.replace(tmp, _record_path(path, sha256))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return

