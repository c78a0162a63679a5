"""Corpus, tokenizer and the training loop (tiny configs, few steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ultramem_dist.model import load_pretrained, preset
from ultramem_dist.train import ByteTokenizer, Corpus, TrainConfig, stdlib_files, train
from ultramem_dist.train.data import is_validation, stdlib_root
from ultramem_dist.train.trainer import value_lr_multiplier


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return Corpus.stdlib(cache_dir=tmp_path_factory.mktemp("cache"))


def test_corpus_is_the_stdlib_split_by_file(corpus, tmp_path):
    files = stdlib_files()
    rels = [str(p.relative_to(stdlib_root())) for p in files]
    assert any(r == "json/decoder.py" for r in rels)
    assert not any(r.startswith("test/") for r in rels)
    n_val = sum(is_validation(r, 0.05) for r in rels)
    assert 0 < n_val < len(rels) // 5
    assert corpus.files_val == n_val and corpus.files_train == len(rels) - n_val
    assert corpus.train.size > 1_000_000 and corpus.val.size > 10_000
    again = Corpus.stdlib(cache_dir=tmp_path)  # same split from a fresh cache
    assert np.array_equal(np.asarray(again.val), np.asarray(corpus.val))


def test_byte_tokenizer_round_trips():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é' * x\n"
    assert tok.decode(tok.encode(text)) == text
    assert max(tok.encode(text)) < tok.vocab_size


def test_value_lr_multiplier_decays_linearly_from_4_to_1():
    cfg = TrainConfig(steps=11)
    assert value_lr_multiplier(0, cfg) == 4.0
    assert value_lr_multiplier(5, cfg) == pytest.approx(2.5)
    assert value_lr_multiplier(10, cfg) == 1.0


def test_training_lowers_loss_checkpoints_and_resumes_deterministically(corpus, tmp_path):
    cfg = preset("micro")
    tcfg = TrainConfig(steps=6, batch_size=4, seq_len=32, eval_every=3, eval_batches=2, warmup=2)
    full = train(cfg, tcfg, tmp_path / "full", corpus=corpus, progress=False)
    assert full.history[-1]["val_loss"] < full.history[0]["val_loss"] + 0.5
    assert full.history[-1]["train_loss"] < np.log(256)
    # stop after 2 steps (off the eval grid), then resume to 6: identical weights
    train(cfg, tcfg, tmp_path / "resumed", corpus=corpus, progress=False, stop_at=2)
    state = torch.load(tmp_path / "resumed" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2
    train(cfg, tcfg, tmp_path / "resumed", corpus=corpus, progress=False, resume=True)
    a = load_pretrained(tmp_path / "full").state_dict()
    b = load_pretrained(tmp_path / "resumed").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_model(corpus, tmp_path):
    tcfg = TrainConfig(steps=2, batch_size=2, seq_len=16, eval_every=1, eval_batches=1, warmup=1)
    train(preset("micro"), tcfg, tmp_path, corpus=corpus, progress=False, stop_at=1)
    with pytest.raises(ValueError, match="different model"):
        train(preset("micro", "dense"), tcfg, tmp_path, corpus=corpus, progress=False, resume=True)
