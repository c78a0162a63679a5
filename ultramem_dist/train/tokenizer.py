"""Byte-level tokenizer: every UTF-8 byte is a token (vocabulary 256, nothing to train)."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    """Lossless for any text; decoding replaces the bytes of a cut multi-byte character."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) & 0xFF for i in ids).decode("utf-8", errors="replace")
