"""UltraMemV2 generation with the shared table served remotely == local generation, with real
``ultramem-dist serve-shard`` processes on loopback.

Stores are exported with the CLI from one random-init micro ``ultramemv2`` checkpoint (pre-values
re-drawn at std 1 so the GELU activation is far from linear and matters): float32 stores must
decode the local model's tokens exactly; bfloat16 stores (``export``'s default) the tokens of the
same checkpoint with its shared values and pre-values rounded to bf16 as the export rounds them
(``MemoryLM.round_value_tables``). Row and dim sharding, thread and process transports, and the
``generate --store`` CLI path.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from conftest import CLI, REPO, micro_v2_model
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.client.process_store import TRANSPORTS, open_remote_store
from ultramem_dist.model import load_pretrained, save_pretrained
from ultramem_dist.store import open_manifest

pytestmark = pytest.mark.integration
app = load_commands()
LAYOUTS = ("row", "dim")  # --by, 2 shards each
DTYPES = ("float32", "bfloat16")
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_pretrained(micro_v2_model(4), tmp_path_factory.mktemp("ckpt-v2"))


@pytest.fixture(scope="module")
def stores(checkpoint, tmp_path_factory, spawn_shards):
    """(dtype, by) -> comma-separated targets of the 2 shard servers of that store."""
    targets = {}
    for dtype in DTYPES:
        for by in LAYOUTS:
            root = tmp_path_factory.mktemp(f"store-v2-{dtype}-{by}")
            args = ["export", str(checkpoint), "--out", str(root), "--shards", "2", "--by", by]
            if dtype == "float32":
                args += ["--dtype", "float32"]  # bfloat16: no flag, the serving default
            res = CliRunner().invoke(app, [*args, "--version", f"v2-{dtype}-{by}"])
            assert res.exit_code == 0, res.output
            _, manifest = open_manifest(root)
            assert manifest.dtype == dtype and manifest.tables[0].pre_vdim == 8
            procs = spawn_shards(root, [0, 1])
            targets[dtype, by] = ",".join(p.target for p in procs)
    return targets


def _prompt() -> torch.Tensor:
    return torch.randint(0, 256, (3, 8), generator=torch.Generator().manual_seed(9))


def _remote_run(checkpoint, target: str, transport: str) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_pretrained(checkpoint).eval()
    model.drop_value_tables()
    with open_remote_store(target, transport=transport) as store:
        assert store.layout.tables["shared"].pre_vdim == 8
        model.set_value_backend(store)
        with torch.no_grad():
            return model(_prompt()), model.generate(_prompt(), NEW_TOKENS)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("by", LAYOUTS)
def test_fp32_store_decodes_the_local_models_tokens(checkpoint, stores, by, transport):
    local = load_pretrained(checkpoint).eval()
    with torch.no_grad():
        want_logits, want_tokens = local(_prompt()), local.generate(_prompt(), NEW_TOKENS)
    got_logits, got_tokens = _remote_run(checkpoint, stores["float32", by], transport)
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("by", LAYOUTS)
def test_bf16_store_decodes_the_tokens_of_a_bf16_rounded_local_model(checkpoint, stores, by):
    rounded = load_pretrained(checkpoint).eval()
    rounded.round_value_tables(torch.bfloat16)
    exact = load_pretrained(checkpoint).eval()
    with torch.no_grad():
        want_logits, want_tokens = rounded(_prompt()), rounded.generate(_prompt(), NEW_TOKENS)
        exact_logits = exact(_prompt())
    got_logits, got_tokens = _remote_run(checkpoint, stores["bfloat16", by], "thread")
    assert torch.equal(got_tokens, want_tokens)
    assert (got_logits - want_logits).abs().max().item() <= 1e-5
    # the rounding is real, pre-values included (a store left in fp32 would fail above)
    assert (want_logits - exact_logits).abs().max().item() > 1e-5
    assert not torch.equal(rounded.shared_table.pre_values, exact.shared_table.pre_values)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_generate_cli_with_a_remote_v2_store(checkpoint, stores, transport):
    args = ["generate", "--checkpoint", str(checkpoint), "--store", stores["float32", "dim"]]
    args += ["--prompt", "def f(", "--max-new-tokens", "8", "--compare-local"]
    res = subprocess.run(
        [*CLI, *args, "--lookup", transport],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert "remote tokens are identical to the local model's" in " ".join(res.stderr.split())
    assert res.stdout.startswith("def f(")
