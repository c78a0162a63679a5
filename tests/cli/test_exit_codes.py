"""One exit-code rule for every command (README "Command line"): bad input exits 2 with one
``error: ...`` sentence on stderr, a runtime failure (nothing listening, unreachable cluster)
exits 1, and neither prints a traceback or a framework error box.

Table-driven: each row is ``(argv, code, words the sentence must contain)``. ``STORE`` and
``CKPT`` in argv are replaced by a real 1-shard store / micro checkpoint, ``EMPTY`` by an empty
directory, ``FILE`` by a plain file, ``NOPE`` by a path that does not exist. Every case here is
answered before Ray, a server or a network call starts (``scale --shard 7`` against a live
deployment is covered by the cluster CLI test)."""

from __future__ import annotations

import socket

import pytest
import torch
from typer.testing import CliRunner

from ultramem_dist.cli import load_commands
from ultramem_dist.model import MemoryLM, preset, save_pretrained
from ultramem_dist.store import export_checkpoint

app = load_commands()


def _dead_port() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


DEAD = _dead_port()

BAD_INPUT = [
    # export
    (["export", "CKPT", "--out", "STORE2", "--shards", "0"], ["--shards"]),
    (["export", "CKPT", "--out", "STORE2", "--by", "diagonal"], ["--by", "row"]),
    (["export", "CKPT", "--out", "STORE2", "--dtype", "int8"], ["--dtype"]),
    (["export", "CKPT", "--out", "STORE2", "--merged", "true"], ["true"]),
    (["export", "EMPTY", "--out", "STORE2"], ["EMPTY"]),
    (["export", "CKPT"], ["--out"]),
    (["export"], ["CHECKPOINT"]),
    # train / generate / demo
    (["train", "--out", "EMPTY", "--model", "transformer"], ["--model", "ultramem"]),
    (["train", "--out", "EMPTY", "--config", "huge"], ["--config", "tiny"]),
    (["train", "--out", "EMPTY", "--steps", "0"], ["--steps"]),
    (["train", "--out", "EMPTY", "--overrides", "{not json"], ["configuration"]),
    (["generate", "--prompt", "def "], ["--checkpoint"]),
    (["generate", "--checkpoint", "CKPT"], ["--prompt"]),
    (["generate", "--checkpoint", "NOPE", "--prompt", "x"], ["NOPE"]),
    (["generate", "--checkpoint", "CKPT", "--prompt", "x", "--lookup", "fiber"], ["--lookup"]),
    (["generate", "--checkpoint", "CKPT", "--prompt", "x", "--max-new-tokens", "0"], ["tokens"]),
    (["generate", "--checkpoint", "CKPT", "--prompt", "x", "--tls-ca", "FILE"], ["--store"]),
    (["import-official", "FILE", "--out", "STORE2", "--topm", "3"], ["not a torch state-dict"]),
    (["import-official", "NOPE", "--out", "STORE2", "--topm", "3"], ["NOPE", "does not exist"]),
    (["import-official", "FILE", "--out", "STORE2"], ["--topm"]),
    (["import-official", "FILE", "--out", "CKPT", "--topm", "3"], ["already holds a checkpoint"]),
    (["demo", "--steps", "0"], ["--steps"]),
    (["demo", "--shards", "0"], ["--shards"]),
    # serve-shard / lookup / info / serve-router
    (["serve-shard", "STORE"], ["--shard"]),
    (["serve-shard", "NOPE", "--shard", "0"], ["NOPE"]),
    (["serve-shard", "STORE", "--shard", "0", "--port", "70000"], ["--port"]),
    (["serve-shard", "STORE", "--shard", "0", "--version", "nope"], ["nope"]),
    (["lookup", "--target", DEAD], ["--table"]),
    (["lookup", "--target", DEAD, "--table", "mem0", "--random", "0"], ["--random"]),
    (["info", "--target", DEAD, "--timeout", "0"], ["--timeout"]),
    (["serve-router", "--targets", DEAD, "--port", "-1"], ["--port"]),
    # up / status / scale / roll
    (["up", "NOPE"], ["does not exist"]),
    (["up", "EMPTY"], ["not a value store", "export"]),
    (["up", "STORE", "--version", "nope"], ["no version 'nope'", "v1"]),
    (["up", "STORE", "--replicas", "0"], ["--replicas"]),
    (["up", "STORE", "--shards", "0"], ["--shards"]),
    (["up", "STORE", "--by", "diagonal"], ["--by"]),
    (["up", "STORE", "--port", "70000"], ["--port"]),
    (["up", "STORE", "--resource", "GPU"], ["NAME=AMOUNT"]),
    (["up", "STORE", "--tls-cert", "FILE"], ["--tls-key"]),
    (["status", "--window", "0"], ["--window"]),
    (["status", "--tls-cert", "FILE"], ["tls_key"]),
    (["scale"], ["--shard K --replicas R", "--shards S"]),
    (["scale", "--shards", "0"], ["--shards"]),
    (["scale", "--shard", "7"], ["--shard K --replicas R"]),
    (["scale", "--shard", "0", "--replicas", "0"], ["--replicas"]),
    (["scale", "--shard", "0", "--replicas", "2", "--shards", "3"], ["either"]),
    (["scale", "--shards", "2", "--by", "diagonal"], ["--by"]),
    (["roll", "STORE", "--version", "nope"], ["no version 'nope'"]),
    (["roll", "EMPTY"], ["not a value store"]),
    (["roll"], ["Missing argument"]),
    # reliability tools
    (["loadtest"], ["--target", "--spawn"]),
    (["loadtest", "--target", DEAD, "--concurrency", "0"], ["--concurrency"]),
    (["chaos", "--replicas", "1"], ["--replicas"]),
    (["fuzz"], ["--target"]),
    (["fuzz", "--target", DEAD, "--cases", "0"], ["--cases"]),
    # the group itself
    (["no-such-command"], ["no-such-command"]),
    (["export", "--no-such-flag"], ["--no-such-flag"]),
]

RUNTIME_FAILURE = [
    (["info", "--target", DEAD, "--timeout", "1"], ["info failed"]),
    (["lookup", "--target", DEAD, "--table", "mem0", "--timeout", "1"], ["lookup failed"]),
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("exit")
    torch.manual_seed(0)
    ckpt = save_pretrained(MemoryLM(preset("micro")), root / "ckpt")
    export_checkpoint(ckpt, root / "store", shards=1, version="v1")
    (root / "empty").mkdir()
    (root / "file").write_text("not a pem\n")
    return {
        "CKPT": str(ckpt),
        "STORE": str(root / "store"),
        "STORE2": str(root / "store2"),
        "EMPTY": str(root / "empty"),
        "FILE": str(root / "file"),
        "NOPE": str(root / "nope"),
    }


def _run(argv: list[str], paths: dict[str, str]):
    args = [paths.get(a, a) for a in argv]
    return args, CliRunner().invoke(app, args)


def _check(argv, words, code, paths):
    args, res = _run(argv, paths)
    shown = [paths.get(w, w) for w in words]
    assert res.exit_code == code, (args, res.exit_code, res.stdout, res.stderr, res.exception)
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, res.stderr)
    assert all(w in lines[0] for w in shown), (args, lines[0], shown)
    assert "Traceback" not in res.stderr and "╭" not in res.stderr


@pytest.mark.parametrize(("argv", "words"), BAD_INPUT, ids=[" ".join(c[0]) for c in BAD_INPUT])
def test_bad_input_exits_2_with_one_sentence(argv, words, paths):
    _check(argv, words, 2, paths)


@pytest.mark.parametrize(
    ("argv", "words"), RUNTIME_FAILURE, ids=[" ".join(c[0]) for c in RUNTIME_FAILURE]
)
def test_runtime_failure_exits_1_with_one_sentence(argv, words, paths):
    _check(argv, words, 1, paths)


def test_every_command_has_a_bad_input_row():
    commands = {info.name or info.callback.__name__ for info in app.registered_commands}
    covered = {argv[0] for argv, _ in BAD_INPUT}
    assert commands - {"down"} <= covered, commands - covered  # `down` takes no input but --address


def test_help_and_version_exit_0(paths):
    for argv in (["--help"], ["--version"], ["export", "--help"], ["up", "--help"]):
        _, res = _run(argv, paths)
        assert res.exit_code == 0, (argv, res.stderr)
    _, res = _run(["--version"], paths)
    assert res.stdout.startswith("ultramem-dist ")


@pytest.mark.parametrize("command", [[], *([c] for c in ("export", "train", "generate", "up"))])
def test_help_reads_like_click(command, paths):
    """No ``<bool>`` for flags, ``CAPS`` arguments without braces, choices listed, required
    options marked, negative flags shown."""
    _, res = _run([*command, "--help"], paths)
    assert res.exit_code == 0, res.stderr
    text = res.stdout
    usage = next(ln for ln in text.splitlines() if "Usage:" in ln)
    assert "<bool>" not in text and "{" not in usage
    if command == ["export"]:
        assert "Usage: ultramem-dist export [OPTIONS] CHECKPOINT" in text
        assert "--merged" in text and "--no-merged" in text and "<row|dim|auto>" in text
    if command == ["generate"]:
        line = next(ln for ln in text.splitlines() if "--checkpoint" in ln)
        assert "*" in line  # required
    if command == ["train"]:
        assert "<tiny|micro>" in text
