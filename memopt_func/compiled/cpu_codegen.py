"""Inductor options for steps compiled on a CPU with 512-bit vectors.

Inductor's C++ kernels widen float32 to float64 (a critical rule's ``buf_sum``) through
``at::vec::convert``, which has no 512-bit float/double specialization in torch 2.13's ATen: it
stores the vector to a stack array, converts element by element, and loads the result. g++ 12
vectorizes that loop, but ``-march=native`` on AVX-512 server cores tunes its vectorization for
256 bits, so the loop writes two 256-bit halves that the next 512-bit load cannot take from the
store buffer: a store-forwarding stall on every widening, three per 16 elements in a critical
rule's fused step. ``-mprefer-vector-width=512`` makes the compiler convert whole
512-bit vectors, which stay in registers (``bench/RESULTS.md``, "The C++ compiler's own loops
in 512-bit vectors"). The flag changes only how the C++ compiler vectorizes loops that
Inductor wrote scalar; Inductor's kernels and their numbers are the same (each conversion is
exact, and no reduction is reordered without ``-ffast-math``).
"""

from __future__ import annotations

import platform
import sys
from typing import Any

import torch

PREFER_512 = "-mprefer-vector-width=512"


def inductor_options(device: torch.device) -> dict[str, Any]:
    """The Inductor options (``torch.compile(options=...)``) for a step on ``device``:
    ``{"cpp.march": "native -mprefer-vector-width=512"}`` on a Linux x86-64 CPU whose Inductor
    vectors are 512 bits wide, compiled by g++ or clang, where the process has not chosen its own
    ``cpp.march`` (``TORCHINDUCTOR_CPP_MARCH``) or ``cpp.simdlen``; otherwise nothing. Nothing
    either where Inductor has no ``cpp.march`` (torch 2.11 has none; 2.13 has it)."""
    if device.type != "cpu" or sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return {}
    from torch._inductor import config

    cpp = getattr(config, "cpp", None)
    if cpp is None or not hasattr(cpp, "march") or cpp.march is not None or cpp.simdlen not in (None, 512):
        return {}
    if not _compiler_takes_flag() or _vector_bits() != 512:
        return {}
    # Inductor passes cpp.march as "-march={value}" and splits its command line like a shell
    return {"cpp.march": f"native {PREFER_512}"}


def _vector_bits() -> int:
    """The width of the vectors Inductor's C++ kernels use on this CPU (0: not vectorized)."""
    try:
        from torch._inductor.cpu_vec_isa import pick_vec_isa
    except ImportError:
        return 0
    isa = pick_vec_isa()
    return isa.bit_width() if isa else 0


def _compiler_takes_flag() -> bool:
    """Whether Inductor's C++ compiler is g++ or clang (both take ``-mprefer-vector-width``)."""
    try:
        from torch._inductor.cpp_builder import _is_clang, _is_gcc, get_cpp_compiler
    except ImportError:
        return False
    try:
        cxx = get_cpp_compiler()
    except Exception:  # no compiler found: Inductor itself will say so when it compiles
        return False
    return bool(_is_gcc(cxx) or _is_clang(cxx))
