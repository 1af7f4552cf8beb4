"""Where downloaded and built artefacts live.

``DEVMODEL_CACHE`` wins; otherwise ``.cache/`` at the top of the project checkout (git
ignores it). Nothing outside that directory is ever written, so set-up needs no root and
leaves the system untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir(*parts: str) -> Path:
    """Return (and create) a directory inside the cache."""
    base = Path(os.environ.get("DEVMODEL_CACHE") or PROJECT_ROOT / ".cache")
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def digest(*items: object) -> str:
    """A short stable hash of JSON-able inputs, used to key cached artefacts."""
    blob = json.dumps(items, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(*paths: Path) -> str:
    """A short hash of files' contents (a build input list)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]
