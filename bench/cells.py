"""One benchmark cell in a fresh Python process: the code runs with the checkout on its path and
prints JSON as its last line, which comes back parsed. A cell that fails raises ``CellFailed``,
with its stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CellFailed(RuntimeError):
    """A cell's process exited with an error; ``stderr`` is what it wrote there."""

    def __init__(self, returncode: int, stderr: str) -> None:
        super().__init__(f"benchmark cell failed (exit {returncode}):\n{stderr[-3000:]}")
        self.returncode, self.stderr = returncode, stderr

    def last_line(self) -> str:
        """The last line of its stderr (the exception's message, for a Python error)."""
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {self.returncode}"


def run_json(code: str, env: dict[str, str] | None = None, empty_inductor_cache: bool = False) -> Any:
    """Run ``code`` with ``python -c`` in the checkout (``env`` added to the environment; with
    ``empty_inductor_cache`` in fresh Inductor and Triton caches) and return its last stdout line
    as JSON."""
    with tempfile.TemporaryDirectory() as cache:
        extra = {"TORCHINDUCTOR_CACHE_DIR": cache, "TRITON_CACHE_DIR": cache} if empty_inductor_cache else {}
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT, **extra, **(env or {})},
        )
    if out.returncode != 0:
        raise CellFailed(out.returncode, out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])
