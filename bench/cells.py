"""One benchmark cell in a fresh Python process: the code runs with the checkout on its path and
prints JSON as its last line, which comes back parsed. A cell that fails raises, with its stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_json(code: str, env: dict[str, str] | None = None, empty_inductor_cache: bool = False) -> Any:
    """Run ``code`` with ``python -c`` in the checkout (``env`` added to the environment; with
    ``empty_inductor_cache`` in a fresh Inductor cache) and return its last stdout line as JSON."""
    with tempfile.TemporaryDirectory() as cache:
        extra = {"TORCHINDUCTOR_CACHE_DIR": cache} if empty_inductor_cache else {}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **extra, **(env or {})},
        )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark cell failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
