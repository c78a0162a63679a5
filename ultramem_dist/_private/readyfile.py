"""Ready files: the JSON a server writes once it accepts calls (port, pid, ...).

Written atomically (a temporary file beside it, then ``os.replace``), so a watcher polling
for the file never reads a partial one. No gRPC/torch imports: the ``--respawn`` supervisor
uses it before it forks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_ready_file"]


def write_ready_file(path: Path, info: dict[str, Any]) -> None:
    """Write ``info`` as JSON to ``path`` atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, path)
