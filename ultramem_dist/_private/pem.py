"""Reading PEM files for TLS (servers and clients): one check, one error wording."""

from __future__ import annotations

from pathlib import Path

__all__ = ["read_pem"]


def read_pem(path: str | Path, what: str) -> bytes:
    """Bytes of a PEM file; raises ``ValueError`` naming ``what`` if unreadable or not PEM."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {p}: {exc.strerror}") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"the {what} file {p} is not PEM (no '-----BEGIN' line)")
    return data
