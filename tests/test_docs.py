"""The documentation: the site builds in strict mode (a broken link, a missing page or any other
warning fails), every public name of the documented modules has a docstring and an entry in the
API reference, and every ``python`` example of README.md and docs/ runs.

A page's examples run in order in one namespace that starts with ``PRELUDE`` (a small ``model``,
``loader`` and ``loss_fn``, as the examples assume), in a fresh working folder. A block preceded
by ``<!-- example: not run, REASON -->`` is skipped; none is at present.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import socket
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTED = ["memopt_func", "memopt_func.rules", "memopt_func.optim", "memopt_func.compiled", "memopt_func.migrate", "memopt_func.checkpoint", "memopt_func.schema", "memopt_func.groups", "memopt_func.registry"]
PAGES = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))]
SKIP = re.compile(r"<!-- example: not run, (.+?) -->")

PRELUDE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
members = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)) for _ in range(3)]
loader = [(torch.randn(32, 8), torch.randn(32, 4)) for _ in range(3)]
loss_fn = nn.functional.mse_loss
schedule = lambda step: 1e-3 * (1 + step) ** -0.5
step = 0
"""


def examples(page: str) -> list[tuple[int, str, str | None]]:
    """(line, code, why it is not run or None) of each ``python`` block of a page."""
    lines = open(os.path.join(ROOT, page)).read().split("\n")
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            skip = SKIP.search(before)
            j = i + 1
            while lines[j].strip() != "```":
                j += 1
            out.append((i + 1, "\n".join(lines[i + 1 : j]), skip.group(1) if skip else None))
            i = j
        i += 1
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_process_group(ns, tmp_path, monkeypatch):
    """The distributed example as one gloo process on 127.0.0.1, over a model with ``layers``."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 4)])

        def forward(self, x):
            return self.layers[1](torch.tanh(self.layers[0](x)))

    ns["model"] = Net()


def _published_checkpoint(ns, tmp_path, monkeypatch):
    """``published_checkpoint.pt`` as the published Adam_CM saves it (tests/published_layout.py
    stands in for cmoptimizer, which is not on the package index)."""
    from published_layout import PUBLISHED, pickled_as_cmoptimizer

    opt = PUBLISHED["Adam_CM"](ns["model"].parameters(), lr=1e-3)
    for x, y in ns["loader"]:
        opt.zero_grad()
        ns["loss_fn"](ns["model"](x), y).backward()
        opt.step()
    with open(tmp_path / "published_checkpoint.pt", "wb") as f:
        f.write(pickled_as_cmoptimizer(opt.state_dict(), monkeypatch).getvalue())


SETUP = {"docs/guides/distributed.md": _one_process_group, "docs/guides/migration.md": _published_checkpoint}
WITH_EXAMPLES = [p for p in PAGES if examples(p)]


def test_the_pages_with_examples_are_the_ones_expected():
    assert {"README.md", "docs/guides/dropin.md", "docs/guides/functional.md", "docs/guides/compiled.md",
            "docs/guides/low-memory.md", "docs/guides/distributed.md", "docs/guides/checkpoints.md",
            "docs/guides/migration.md"} <= set(WITH_EXAMPLES)
    assert not [(p, line, why) for p in PAGES for line, _, why in examples(p) if why], "every example runs"


@pytest.mark.parametrize("page", WITH_EXAMPLES)
def test_every_example_of_a_page_runs(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": f"example:{page}"}
    exec(PRELUDE, ns)
    if page in SETUP:
        SETUP[page](ns, tmp_path, monkeypatch)
    try:
        for line, code, why in examples(page):
            if why is None:
                exec(compile(code, f"{page}:{line}", "exec"), ns)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def test_the_site_builds_strictly_with_every_page(site):
    for page in ["index.html", "guides/dropin/index.html", "SPEC/index.html", "bench/RESULTS/index.html",
                 "CHANGELOG/index.html", "reference/cli/index.html"]:
        assert (site / page).exists(), page
    cli = (site / "reference/cli/index.html").read_text()
    assert "memopt-func lm" in cli and "--lr-sweep" in cli, "the command line reference is the commands' --help"


def _public(module: str) -> list[str]:
    return [n for n in importlib.import_module(module).__all__ if not isinstance(getattr(importlib.import_module(module), n), type(os))]


def test_every_public_name_has_a_docstring():
    import griffe

    package = griffe.load("memopt_func", search_paths=[ROOT], resolve_aliases=True, resolve_external=False)
    missing = []
    for module in DOCUMENTED:
        node = package if module == "memopt_func" else package[module.removeprefix("memopt_func.")]
        missing += [f"{module}.{n}" for n in _public(module) if not node[n].docstring]
    assert not missing, f"public names without a docstring: {missing}"


def test_every_public_name_has_an_entry_in_the_api_reference(site):
    html = "".join(p.read_text() for p in (site / "reference").rglob("index.html"))
    missing = []
    for module in DOCUMENTED:
        for name in _public(module):
            where = [module] if module != "memopt_func" else ["memopt_func", "memopt_func.optim", "memopt_func.rules"]
            if not any(f'id="{m}.{name}"' in html for m in where):
                missing.append(f"{module}.{name}")
    assert not missing, f"public names the API reference does not list: {missing}"
