"""File modes of what the store writers create: honour the process umask.

``tempfile.mkstemp``/``mkdtemp`` and safetensors' writer create files 0600 and directories
0700 whatever the umask, so a store exported by one uid would be unreadable by another (the
chart's non-root pods). Every writer calls :func:`apply_umask` on what it created, giving the
modes ``open()``/``mkdir()`` would have given: 0644 / 0755 under the usual umask 022.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["apply_umask", "current_umask"]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; elsewhere
    the set-and-restore dance, which is only racy against other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def apply_umask(path: str | Path) -> None:
    """chmod ``path`` to 0666 (file) or 0777 (directory) minus the umask."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())
