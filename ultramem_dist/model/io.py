"""Checkpoints: ``config.json`` + ``model.safetensors`` (+ ``tokenizer.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from ultramem_dist.model.config import LMConfig
from ultramem_dist.model.lm import MemoryLM
from ultramem_dist.store.perms import apply_umask

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"


def save_pretrained(model: MemoryLM, path: str | Path, extra: dict | None = None) -> Path:
    """Write the model's config and weights to directory ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model": model.cfg.to_dict(), "config_hash": model.cfg.compute_hash()}
    config.update(extra or {})
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_FILE), metadata={"config_hash": model.cfg.compute_hash()})
    apply_umask(path / WEIGHTS_FILE)  # safetensors writes 0600; readers may be other uids
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    (path / TOKENIZER_FILE).write_text(json.dumps({"type": "bytes", "vocab_size": 256}))
    return path


def load_config(path: str | Path) -> LMConfig:
    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    data = json.loads(cfg_file.read_text())
    return LMConfig.from_dict(data["model"])


def load_pretrained(
    path: str | Path, map_location: str = "cpu", allow_memory_only: bool = False
) -> MemoryLM:
    """Rebuild a :class:`MemoryLM` from a directory written by :func:`save_pretrained`.

    A memory-only import of an official checkpoint (``ultramem-dist import-official
    --memory-only``: real memory layers, a random backbone) is refused unless
    ``allow_memory_only`` (what ``export`` passes: serving the value tables needs no backbone)."""
    path = Path(path)
    cfg = load_config(path)
    imported = json.loads((path / CONFIG_FILE).read_text()).get("imported") or {}
    if imported.get("memory_only") and not allow_memory_only:
        raise ValueError(
            f"{path} is a memory-only import of an official checkpoint (its backbone is a random "
            "init, not trained weights): only `ultramem-dist export` reads it"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint: {WEIGHTS_FILE} is missing")
    model = MemoryLM(cfg)
    state = load_file(str(weights), device=map_location)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {path} does not match its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    model.eval()
    return model
