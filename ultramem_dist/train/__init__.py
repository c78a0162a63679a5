"""Data (stdlib corpus, byte tokenizer) and the training loop."""

from ultramem_dist.train.data import BatchSampler, Corpus, eval_batches, stdlib_files
from ultramem_dist.train.tokenizer import ByteTokenizer
from ultramem_dist.train.trainer import TrainConfig, TrainResult, evaluate, train

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "Corpus",
    "TrainConfig",
    "TrainResult",
    "eval_batches",
    "evaluate",
    "stdlib_files",
    "train",
]
