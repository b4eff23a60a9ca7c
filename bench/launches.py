"""Kernel launches of one eager optimizer step, counted instead of timed (SPEC.md, "Launches").

On an accelerator an eager step's time is set by how many kernels it launches. Counted on the
``meta`` device, which takes the accelerator's code path (no host reads of device values) and
computes nothing: every ATen operator on a device tensor that reaches the backend below
autograd is one launch (a multi-tensor ``_foreach_`` operator is one), views left out. A step is counted after one warm-up step, so state
creation (and an eager drop-in's laying out of a flat group, ``MemoryOptimizer._steps_grouped``)
is not in it. The published cmoptimizer loop reads priorities on the host, which a meta
tensor cannot do: its cells count on the CPU, where the same loop dispatches the same operators.

    python bench/launches.py            # the table, 200 and 400 tensors
    python bench/launches.py --json     # the same as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.dirname(os.path.abspath(__file__))):
    if path not in sys.path:
        sys.path.insert(0, path)


# Allocations without a fill: no kernel.
_NO_LAUNCH = frozenset({"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"})


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched below autograd that read or write a tensor on
    ``device``. Left out: views and bare allocations (``empty`` and its kin), which launch
    nothing; the profiler's record-function markers; and operators on host tensors only
    (torch.optim's CPU ``step`` counters read with ``.item()``), which launch nothing on the
    accelerator. A factory that fills a device tensor (``zeros``, ``arange``, ``scalar_tensor``)
    and a copy to the device count."""

    def __init__(self, device: str) -> None:
        super().__init__()
        self.device = device
        self.count = 0
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if func.is_view or name in _NO_LAUNCH or name.startswith("_record_function"):
            return out
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        if any(t.device.type == self.device for t in tensors):
            self.count += 1
            self.names[name] = self.names.get(name, 0) + 1
        return out


def _params(n: int, numel: int, device: str) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(numel, device=device) if device != "meta" else torch.empty(numel, device="meta")) for _ in range(n)]


def count_step(make: Callable[[list[torch.nn.Parameter]], Any], n: int, numel: int, device: str = "meta") -> OpCounter:
    """The operators of one step of ``make(params)`` over ``n`` tensors of ``numel`` elements,
    after a warm-up step (gradients set outside the count)."""
    params = _params(n, numel, device)
    opt = make(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.ones_like(p) if device == "meta" else torch.randn_like(p)
        counter = OpCounter(device)
        with torch.no_grad(), counter:
            opt.step()
    return counter


def _ours(name: str, **kw: Any) -> Callable:
    from memopt_func import optim

    return lambda params: getattr(optim, name)(params, lr=1e-3, **kw)


def _published(cls_name: str) -> Callable:
    import published_style

    return lambda params: getattr(published_style, cls_name)(params, lr=1e-3)


# label: (make, elements per tensor, device). 8-bit cells use 8,192 elements (8-bit state keeps
# tensors of 4,096 and more), as in the issue that asked for this table.
CELLS: dict[str, tuple[Callable, int, str]] = {
    "torch.optim.AdamW(foreach=True)": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), 1000, "meta"),
    "AdEMAMix": (_ours("AdEMAMix"), 1000, "meta"),
    "Adam_CM": (_ours("Adam_CM"), 1000, "meta"),
    "Adam_C": (_ours("Adam_C"), 1000, "meta"),
    "SGD_C": (_ours("SGD_C"), 1000, "meta"),
    "RMSprop_C": (_ours("RMSprop_C"), 1000, "meta"),
    "Adam_C, synced=False": (_ours("Adam_C", synced=False), 1000, "meta"),
    "AdEMAMix, bf16 state": (_ours("AdEMAMix", state_dtype=torch.bfloat16), 1000, "meta"),
    "Adam_CM, bf16 state and buffer": (_ours("Adam_CM", state_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16), 1000, "meta"),
    "Adam_CM, bf16 state and buffer, nearest": (
        _ours("Adam_CM", state_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16, rounding="nearest"), 1000, "meta"
    ),
    "AdEMAMix, int8 state": (_ours("AdEMAMix", state_dtype=torch.int8), 8192, "meta"),
    "Adam_CM, int8 state and buffer": (_ours("Adam_CM", state_dtype=torch.int8, buffer_dtype=torch.int8), 8192, "meta"),
}


def published_cells() -> dict[str, tuple[Callable, int, str]]:
    """The published-style loop (bench/published_style.py) on the CPU, where it can read priorities."""
    names = {"Adam_CM": "PublishedStyleAdamCM", "Adam_C": "PublishedStyleAdamC", "SGD_C": "PublishedStyleSGDC", "RMSprop_C": "PublishedStyleRMSpropC"}
    return {f"published {n} (CPU)": (_published(cls), 1000, "cpu") for n, cls in names.items()}


def table(counts: tuple[int, ...] = (200, 400), cells: dict | None = None) -> dict[str, dict[int, int]]:
    """{label: {tensors: operators per step}} for every cell."""
    cells = cells if cells is not None else {**CELLS, **published_cells()}
    return {label: {n: count_step(make, n, numel, device).count for n in counts} for label, (make, numel, device) in cells.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="200,400", help="tensor counts, comma-separated")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = tuple(int(c) for c in args.counts.split(","))
    result = table(counts)
    if args.json:
        print(json.dumps(result))
        return
    print("| optimizer | " + " | ".join(f"ops, {n} tensors" for n in counts) + " |")
    print("|---|" + "---|" * len(counts))
    for label, row in result.items():
        print(f"| {label} | " + " | ".join(f"{row[n]:,}" for n in counts) + " |")


if __name__ == "__main__":
    main()
