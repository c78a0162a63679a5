"""The shared decoder LM: skip-layer wiring, baselines, KV cache, checkpoints, configs."""

from __future__ import annotations

import pytest
import torch

from ultramem_dist.model import LMConfig, MemoryLM, load_pretrained, preset, save_pretrained
from ultramem_dist.model.config import parse_memory_spec


def _model(kind: str = "ultramem", seed: int = 0) -> MemoryLM:
    torch.manual_seed(seed)
    return MemoryLM(preset("micro", kind)).eval()


def test_memory_reads_block_a_pre_ffn_and_is_added_after_block_b():
    model = _model()
    (a, b), _ = model.memory_pairs  # micro: "0:1,2:3"
    assert (a, b) == (0, 1)
    captured: dict[str, torch.Tensor] = {}
    model.blocks[a].ln_ffn.register_forward_hook(lambda m, i, o: captured.__setitem__("ln", o))
    layer = model.memory_layers[0]
    original_start = layer.start

    def spy(x):
        captured["read"] = x
        return original_start(x)

    layer.start = spy
    stream: dict[int, torch.Tensor] = {}
    for i, blk in enumerate(model.blocks):
        blk.ln_attn.register_forward_hook(lambda m, inp, o, i=i: stream.__setitem__(i, inp[0]))
    tokens = torch.randint(0, 256, (2, 10))
    model(tokens)
    assert torch.equal(captured["read"], captured["ln"])
    before = {i: t.clone() for i, t in stream.items()}
    with torch.no_grad():
        layer.out_proj.weight.mul_(10.0)  # change only memory layer 0's contribution
    model(tokens)
    for i in range(b + 1):  # inputs of blocks 0..b are unaffected
        assert torch.equal(stream[i], before[i]), i
    assert not torch.allclose(stream[b + 1], before[b + 1])  # added right after block b


@pytest.mark.parametrize("kind", ["dense", "pkm", "moe", "ultramem"])
def test_all_four_models_train_one_step(kind):
    model = _model(kind).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (4, 17))
    first, total = model.loss(tokens)
    total.backward()
    opt.step()
    model.refresh_svd()
    second, _ = model.loss(tokens)
    assert float(second.detach()) < float(first.detach())
    counts = model.param_counts()
    assert counts["activated"] <= counts["total"]
    assert (counts["sparse"] > 0) == (kind != "dense")


def test_kv_cache_decoding_equals_full_forward_greedy():
    model = _model()
    prompt = torch.randint(0, 256, (2, 5))
    out = model.generate(prompt, 8)
    seq = prompt
    for _ in range(8):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq)


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _model("ultramem", seed=3)
    save_pretrained(model, tmp_path / "ckpt")
    loaded = load_pretrained(tmp_path / "ckpt")
    tokens = torch.randint(0, 256, (2, 12))
    assert torch.equal(model(tokens), loaded(tokens))
    assert torch.equal(model.memory_layers[0].ive_perm, loaded.memory_layers[0].ive_perm)


def test_remote_style_backend_gets_the_same_answer_as_local():
    """A backend that answers from a copy of the table through the seam matches local."""
    from concurrent.futures import Future

    from ultramem_dist.kernels import gather_pool

    model = _model()
    tables = {m.table_id: m.values.detach().clone() for m in model.ultramem_layers()}
    calls = []

    class CopyBackend:
        def submit(self, table_id, sel):
            calls.append(table_id)
            fut: Future = Future()
            fut.set_result(gather_pool(tables[table_id], sel.indices, sel.blocks, sel.weights, 4))
            return fut

    tokens = torch.randint(0, 256, (2, 9))
    local = model(tokens)
    model.drop_value_tables()
    model.set_value_backend(CopyBackend())
    with torch.no_grad():
        remote = model(tokens)
    torch.testing.assert_close(remote, local, atol=1e-5, rtol=1e-5)
    assert calls == ["mem0", "mem1"]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("2:1", "backwards"),
        ("1:1", "backwards"),
        ("0:2,2:3", "overlaps"),
        ("0:9", "outside"),
        ("0-2", "form"),
    ],
)
def test_bad_skip_specs_raise_clear_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_memory_spec(spec, n_layers=4)


def test_bad_model_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="kind"):
        LMConfig(kind="mystery")
    with pytest.raises(ValueError, match="perfect square"):
        LMConfig.from_dict({**preset("micro").to_dict(), "ultramem": {"expansion": 3}})
    with pytest.raises(ValueError, match="unknown"):
        LMConfig.from_dict({"d_model": 64, "bogus": 1})
    with pytest.raises(ValueError, match="max_seq"):
        _model().generate(torch.zeros(1, 60, dtype=torch.long), 10)


def test_in_place_spec_allowed_for_memory_layers():
    assert parse_memory_spec("1:1", 4, allow_same_block=True) == [(1, 1)]
    assert preset("tiny", "pkm").memory_pairs() == [(2, 2), (5, 5)]
    # the UltraMem ablation ladder's one-layer base has no skip (docs/ablation.md)
    ultra = LMConfig.from_dict({**preset("micro").to_dict(), "memory_spec": "2:2"})
    assert ultra.memory_pairs() == [(2, 2)]
