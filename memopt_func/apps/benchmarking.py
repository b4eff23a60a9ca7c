"""Measurements shared by ``memopt-func bench`` and the pytest-benchmark files in ``bench/``.

Nothing here imports pytest or matplotlib. Step times are wall-clock medians after warm-up,
with the device synchronised around each step. The byte roofline of a step counts what the
update must move: the parameters read and written, the gradients read, and each per-parameter
state tensor read and written once, where a critical buffer counts as the one slot a step
writes (the other ``topC - 1`` slots are not touched). Divided by the copy bandwidth measured in
the same run, it is the fastest a memory-bound step could be on this machine.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from . import catalog


def synchronize(device: torch.device | str) -> None:
    """Wait for queued work on ``device`` (a no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (everything in ``optimizer.state``)."""
    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                total += tensor_bytes(value)
    return total


def param_count(optimizer: torch.optim.Optimizer) -> int:
    return sum(p.numel() for g in optimizer.param_groups for p in g["params"])


def bytes_per_step(optimizer: torch.optim.Optimizer) -> int:
    """The roofline's traffic: params read + written, grads read, and per parameter each state
    tensor of its size read + written (``critical_buf``, ``[topC, *shape]``, as one slot)."""
    total = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            size = tensor_bytes(p)
            total += 2 * size + (size if p.grad is not None else 0)
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.numel() >= p.numel() > 0:
                    total += 2 * size * (value.element_size() / p.element_size())
    return int(total)


def _median_seconds(fn: Callable[[], Any], repeats: int, device: torch.device | str) -> float:
    return statistics.median(time_steps(fn, warmup=1, repeats=repeats, device=device))


def copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10, device: torch.device | str = "cpu") -> float:
    """Bytes per second of ``dst.copy_(src)`` on ``device`` (read + write counted), median of ``repeats``.

    Use a tensor well beyond the last-level cache; smaller copies measure the cache instead."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * tensor_bytes(src) / _median_seconds(lambda: dst.copy_(src), repeats, device)


def stream_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 10, device: torch.device | str = "cpu") -> dict[str, float]:
    """Bytes per second of streaming kernels on ``device``: eager ``copy_``, and ``torch.compile``d
    copy, triad (``a = b + 0.5 * c``) and in-place update (``a += 0.5 * b``, the access pattern of
    optimizer state: read, then write back the same lines, which costs no read-for-ownership).
    ``max`` of them is the bandwidth a step can reach here."""
    n = max(1, nbytes // 4)
    a, b, c = (torch.ones(n, dtype=torch.float32, device=device) for _ in range(3))
    size = tensor_bytes(a)
    torch._dynamo.reset()
    copy = torch.compile(lambda dst, src: dst.copy_(src), fullgraph=True)
    triad = torch.compile(lambda dst, x, y: dst.copy_(x + 0.5 * y), fullgraph=True)
    update = torch.compile(lambda dst, x: dst.add_(0.5 * x), fullgraph=True)
    out = {
        "copy_": 2 * size / _median_seconds(lambda: a.copy_(b), repeats, device),
        "compiled copy": 2 * size / _median_seconds(lambda: copy(a, b), repeats, device),
        "compiled triad": 3 * size / _median_seconds(lambda: triad(a, b, c), repeats, device),
        "compiled in-place update": 3 * size / _median_seconds(lambda: update(a, b), repeats, device),
    }
    torch._dynamo.reset()
    out["max"] = max(out.values())
    return out


def make_params(
    size: int, n_tensors: int = 4, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", seed: int = 0
) -> list[torch.nn.Parameter]:
    """``n_tensors`` parameters (1-D, near-equal lengths) totalling ``size`` elements, each with a
    fixed random ``.grad``."""
    if size < 1 or n_tensors < 1:
        raise ValueError(f"invalid size {size} / n_tensors {n_tensors}: both must be >= 1")
    n_tensors = min(n_tensors, size)
    gen = torch.Generator().manual_seed(seed)
    lengths = [size // n_tensors + (1 if i < size % n_tensors else 0) for i in range(n_tensors)]
    params = []
    for n in lengths:
        p = torch.nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype))
        p.grad = torch.randn(n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        params.append(p)
    return params


def time_once(fn: Callable[[], Any], device: torch.device | str = "cpu") -> float:
    """Seconds of one call of ``fn`` (a first step, which compiles), with ``device`` synchronised
    before and after it."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_steps(
    step: Callable[[], Any], warmup: int = 3, repeats: int = 20, device: torch.device | str = "cpu", budget_s: float | None = None
) -> list[float]:
    """Seconds per call of ``step`` after ``warmup`` calls; stops early after ``budget_s`` seconds
    of timed calls (at least 3 are always timed)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    times: list[float] = []
    spent = 0.0
    for _ in range(repeats):
        times.append(time_once(step, device))
        spent += times[-1]
        if budget_s is not None and spent > budget_s and len(times) >= 3:
            break
    return times


@dataclass
class StepTiming:
    """One benchmark cell: an optimizer at one parameter count."""

    optimizer: str
    mode: str  # "eager" or "compiled"
    params: int
    median_s: float
    min_s: float
    repeats: int
    state_bytes: int
    bytes_per_step: int

    def roofline_s(self, bandwidth: float) -> float:
        return self.bytes_per_step / bandwidth

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_optimizer(
    name: str,
    size: int,
    *,
    compile_optimizer: Callable[[torch.optim.Optimizer], Any] | None = None,
    hyper: dict[str, Any] | None = None,
    n_tensors: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    warmup: int = 3,
    repeats: int = 20,
    budget_s: float | None = 2.0,
    seed: int = 0,
) -> StepTiming:
    """Time ``optimizer.step()`` of catalog optimizer ``name`` over ``size`` parameters with fixed
    gradients; ``compile_optimizer`` (e.g. ``memopt_func.compiled.compile_optimizer``) wraps it first."""
    if compile_optimizer is not None:
        # Every cell compiles afresh: compiled steppers share one code object, whose cache would
        # otherwise fill up with earlier cells' shapes and hit torch._dynamo's recompile limit.
        torch._dynamo.reset()
    params = make_params(size, n_tensors, dtype, device, seed)
    opt = catalog.make_optimizer(name, params, **(hyper or {}))
    stepper = compile_optimizer(opt) if compile_optimizer is not None else opt
    times = time_steps(stepper.step, warmup=max(1, warmup), repeats=repeats, device=device, budget_s=budget_s)
    # The optimizer that stepped holds the state (a compiled twin keeps its own).
    stepped = stepper if isinstance(stepper, torch.optim.Optimizer) else opt
    return StepTiming(
        optimizer=name,
        mode="eager" if compile_optimizer is None else "compiled",
        params=size,
        median_s=statistics.median(times),
        min_s=min(times),
        repeats=len(times),
        state_bytes=state_bytes(stepped),
        bytes_per_step=bytes_per_step(stepped),
    )
