"""Make ``ultramem_operator`` (operators/) and the test helpers importable."""

from __future__ import annotations

import sys
from pathlib import Path

_OPERATORS = Path(__file__).resolve().parents[1]
for path in (_OPERATORS, _OPERATORS / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
