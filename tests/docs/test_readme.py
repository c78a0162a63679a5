"""README.md runs as written: its fenced ``bash``/``sh``/``python`` blocks are executed in order,
like doc-tests, so that the README cannot drift from the code.

Convention (for everyone who edits README.md)
---------------------------------------------
* Every ```` ```bash ````, ```` ```sh ```` and ```` ```python ```` block is run, top to bottom, in
  ONE bash session whose working directory is a scratch copy of what a user has after
  ``make demo``: ``.venv`` (the running interpreter's environment; ``source .venv/bin/activate``
  works) and ``artifacts/model`` (a randomly initialised ``tiny`` UltraMem checkpoint instead
  of the 2-minute trained one). Shell state carries over between blocks (variables, background
  jobs such as ``serve-shard ... &``); a ``python`` block runs as ``python -`` in that session.
  Each block runs under ``set -e``: any failing command fails the test, naming the block.
* Other fences (```` ```text ````, ```` ```json ````, diagrams, ...) are not run.
* Directives are HTML comments (invisible on GitHub) on the line right before a fence:
  - ``<!-- readme-test: skip (reason) -->``: not run — for what cannot run in CI (``make demo``
    itself, installs, ``docker``/``helm``/``kubectl`` against a real cluster). Give the reason.
  - ``<!-- readme-test: free-ports 7000 7001 -->``: those port numbers are replaced by free
    loopback ports in this block and every later one (CI machines are shared).
* Keep runnable blocks quick (seconds; the Ray section is the expensive one at about a minute):
  the suite has a time budget. Background processes are killed when the test ends (the whole
  session's process group), and a Ray head started by ``up`` is stopped by the README's own
  ``down`` (``ULTRAMEM_CACHE`` points into the scratch directory so that its state file is
  private to the test).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from ultramem_dist.model import MemoryLM, preset, save_pretrained

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RUN_LANGS = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
FENCE = re.compile(r"^```(\S*)\s*$")
DIRECTIVE = re.compile(r"^<!--\s*readme-test:\s*(\S+)\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directives: dict[str, str] = field(default_factory=dict)


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with the directives on the lines right above it."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1).lower()
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        directives: dict[str, str] = {}
        k = start - 1
        while k >= 0 and (d := DIRECTIVE.match(lines[k])):
            directives[d.group(1)] = d.group(2)
            k -= 1
        blocks.append(Block(start + 1, lang, "\n".join(lines[start + 1 : j]) + "\n", directives))
        i = j + 1
    return blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_script(blocks: list[Block]) -> tuple[str, int]:
    """One bash script running every runnable block in order; returns (script, blocks run)."""
    ports: dict[str, str] = {}
    parts = ["set -e"]
    n = 0
    for b in blocks:
        if b.lang not in RUN_LANGS or "skip" in b.directives:
            continue
        for p in b.directives.get("free-ports", "").split():
            ports.setdefault(p, str(_free_port()))
        code = b.code
        for old, new in ports.items():
            code = re.sub(rf"\b{old}\b", new, code)
        parts.append(f"echo '::readme-block README.md:{b.line}::' >&2")
        if RUN_LANGS[b.lang] == "python":
            parts.append(f"python - <<'README_PY_EOF'\n{code}README_PY_EOF")
        else:
            parts.append(code)
        n += 1
    parts.append("echo '::readme-done::' >&2")
    return "\n".join(parts) + "\n", n


def test_blocks_are_parsed_with_their_directives():
    blocks = readme_blocks(README.read_text())
    runnable = [b for b in blocks if b.lang in RUN_LANGS and "skip" not in b.directives]
    skipped = [b for b in blocks if "skip" in b.directives]
    assert runnable and skipped
    assert all(b.directives["skip"] for b in skipped), "say why a block is skipped"
    assert any("make demo" in b.code for b in skipped)


def test_readme_runs_as_written(tmp_path):
    work = tmp_path / "clone"
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    torch.manual_seed(0)
    save_pretrained(MemoryLM(preset("tiny")), work / "artifacts" / "model")
    script, n = session_script(readme_blocks(README.read_text()))
    assert n >= 3
    env = {
        **os.environ,
        "ULTRAMEM_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "COLUMNS": "120",
    }
    # output to files, not pipes: background jobs (serve-shard ... &) inherit them and would
    # keep a pipe open after the session ends
    out_path, err_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=work,
            env=env,
            stdout=out_f,
            stderr=err_f,
            text=True,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=420)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the session and its background jobs
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
            if (tmp_path / "cache" / "local-ray.json").exists():  # failed before `down`
                subprocess.run(
                    [sys.executable, "-m", "ultramem_dist.cli", "down"], env=env, timeout=120
                )
    out, err = out_path.read_text(), err_path.read_text()
    assert proc.returncode == 0 and "::readme-done::" in err, (
        f"README block at {_last_block(err)} failed (exit {proc.returncode}):\n"
        f"{err[-4000:]}\n--- stdout ---\n{out[-2000:]}"
    )


def _last_block(err: str) -> str:
    found = re.findall(r"::readme-block (\S+)::", err)
    return found[-1] if found else "?"
