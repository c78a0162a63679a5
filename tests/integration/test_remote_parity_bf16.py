"""Remote == local for a bf16 serving store (``export``'s default dtype), with real
``ultramem-dist serve-shard`` processes on loopback.

The local reference is the same checkpoint with its value tables rounded to bf16 exactly as the
export rounds them (``Tensor.to(torch.bfloat16)``, round-to-nearest-even) and kept in fp32: the
shards widen the stored bf16 rows to the same fp32 values and accumulate in fp32, so greedy
decoding must pick the same tokens and the logits agree to fp32 summation-order noise.
"""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.client import RemoteValueStore
from ultramem_dist.model import MemoryLM, load_pretrained, preset, save_pretrained
from ultramem_dist.store import open_manifest

pytestmark = pytest.mark.integration
app = load_commands()
LAYOUTS = {"row": 2, "dim": 2}  # --by -> --shards


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    model = MemoryLM(preset("micro")).eval()
    return save_pretrained(model, tmp_path_factory.mktemp("ckpt-bf16"))


@pytest.fixture(scope="module")
def bf16_targets(checkpoint, tmp_path_factory, spawn_shards):
    """--by -> comma-separated targets of a bf16 store exported with the CLI's defaults."""
    targets = {}
    for by, shards in LAYOUTS.items():
        root = tmp_path_factory.mktemp(f"store-bf16-{by}")
        args = ["export", str(checkpoint), "--out", str(root), "--shards", str(shards)]
        res = CliRunner().invoke(app, [*args, "--by", by, "--version", f"bf16-{by}"])
        assert res.exit_code == 0, res.output
        _, manifest = open_manifest(root)
        assert manifest.dtype == "bfloat16"  # no --dtype: the serving default
        procs = spawn_shards(root, list(range(shards)))
        targets[by] = ",".join(p.target for p in procs)
    return targets


def _rounded_local(checkpoint) -> MemoryLM:
    model = load_pretrained(checkpoint).eval()
    model.round_value_tables(torch.bfloat16)
    return model


@pytest.mark.parametrize("by", list(LAYOUTS))
def test_bf16_store_decodes_the_same_tokens_as_a_bf16_rounded_local_model(
    checkpoint, bf16_targets, by
):
    local = _rounded_local(checkpoint)
    exact = load_pretrained(checkpoint).eval()
    remote = load_pretrained(checkpoint).eval()
    remote.drop_value_tables()
    prompt = torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(7))
    with RemoteValueStore(bf16_targets[by]) as backend:
        remote.set_value_backend(backend)
        with torch.no_grad():
            got_logits = remote(prompt)
            got_tokens = remote.generate(prompt, 12)
    with torch.no_grad():
        want_logits = local(prompt)
        want_tokens = local.generate(prompt, 12)
        exact_logits = exact(prompt)
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max().item() <= 1e-5
    # the rounding is real (the test would not notice a store that silently stayed fp32)
    assert (want_logits - exact_logits).abs().max().item() > 1e-5
