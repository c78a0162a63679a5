"""Put ``operators/`` on sys.path: ``ultramem_operator`` is shipped in the image, not installed.

(No conftest.py here on purpose: other test folders import the repository's tests/conftest.py
as ``conftest`` and a second one on sys.path would shadow it.)
"""

from __future__ import annotations

import sys
from pathlib import Path

OPERATORS = Path(__file__).resolve().parents[1]
if str(OPERATORS) not in sys.path:
    sys.path.insert(0, str(OPERATORS))
