"""Training corpus: the Python standard library's own source files, found with ``sysconfig``.

Deterministic split by file: a file goes to validation when the first byte of the sha256 of its
path relative to the stdlib root is below ``val_fraction * 256``. Test suites, idlelib and lib2to3
are left out (they are mostly fixtures). The byte stream of each split is cached as a ``.npy`` file
keyed by the file list, so later runs start at once.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ultramem_dist.train.tokenizer import ByteTokenizer

_EXCLUDED_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
_SEPARATOR = b"\n\n# ---- file boundary ----\n\n"


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted list of the stdlib ``.py`` files used as the corpus."""
    root = root or stdlib_root()
    files = [
        p for p in root.rglob("*.py") if not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])
    ]
    if not files:
        raise FileNotFoundError(f"no Python source files found under {root}")
    return sorted(files)


def is_validation(rel_path: str, val_fraction: float) -> bool:
    return hashlib.sha256(rel_path.encode()).digest()[0] < int(val_fraction * 256)


def default_cache_dir() -> Path:
    base = os.environ.get("ULTRAMEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ultramem-dist"
    )
    return Path(base)


@dataclass
class Corpus:
    """Train and validation byte streams."""

    train: np.ndarray
    val: np.ndarray
    files_train: int
    files_val: int

    @classmethod
    def stdlib(
        cls, val_fraction: float = 0.05, cache_dir: Path | None = None, root: Path | None = None
    ) -> Corpus:
        root = root or stdlib_root()
        files = stdlib_files(root)
        rels = [str(p.relative_to(root)) for p in files]
        key = hashlib.sha256(
            ("\n".join(rels) + f"|{val_fraction}|{sum(p.stat().st_size for p in files)}").encode()
        ).hexdigest()[:16]
        cache = (cache_dir or default_cache_dir()) / f"stdlib-{key}"
        split = [is_validation(r, val_fraction) for r in rels]
        n_val = sum(split)
        if (cache / "train.npy").is_file() and (cache / "val.npy").is_file():
            return cls(
                np.load(cache / "train.npy", mmap_mode="r"),
                np.load(cache / "val.npy", mmap_mode="r"),
                len(files) - n_val,
                n_val,
            )
        parts: dict[bool, list[bytes]] = {False: [], True: []}
        for path, val in zip(files, split, strict=True):
            parts[val].append(path.read_bytes())
        arrays = {
            val: np.frombuffer(_SEPARATOR.join(chunks), dtype=np.uint8).copy()
            for val, chunks in parts.items()
        }
        if arrays[True].size == 0 or arrays[False].size == 0:
            raise ValueError(f"val_fraction={val_fraction} leaves an empty train or val split")
        cache.mkdir(parents=True, exist_ok=True)
        for name, val in (("train", False), ("val", True)):
            tmp = cache / f"{name}.tmp.npy"
            np.save(tmp, arrays[val])
            tmp.replace(cache / f"{name}.npy")
        return cls(arrays[False], arrays[True], len(files) - n_val, n_val)


class BatchSampler:
    """Random windows of ``seq_len + 1`` tokens from a byte stream, from a seeded generator whose
    state is checkpointed so a resumed run sees the same batches."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if data.size <= seq_len + 1:
            raise ValueError(f"corpus of {data.size} tokens is shorter than seq_len={seq_len}")
        self.data = data
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.rng = np.random.default_rng(seed)

    def next(self) -> torch.Tensor:
        starts = self.rng.integers(0, self.data.size - self.seq_len - 1, size=self.batch_size)
        rows = np.stack([self.data[s : s + self.seq_len + 1] for s in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def eval_batches(
    data: np.ndarray, batch_size: int, seq_len: int, n_batches: int
) -> list[torch.Tensor]:
    """Fixed, evenly spaced validation windows (the same every evaluation)."""
    n = batch_size * n_batches
    span = data.size - seq_len - 1
    starts = np.linspace(0, span, num=n, dtype=np.int64)
    rows = np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64)
    return [torch.from_numpy(rows[i : i + batch_size]) for i in range(0, n, batch_size)]


__all__ = ["BatchSampler", "ByteTokenizer", "Corpus", "eval_batches", "stdlib_files"]
