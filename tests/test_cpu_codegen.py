"""The Inductor options a compiled step gets on a CPU (``memopt_func.compiled.cpu_codegen``).

Which CPUs get ``-mprefer-vector-width=512``, that a user's own options win, and that the flag
changes no number: a step compiled with it equals, bit for bit, the step compiled without it.
No timing here (``bench/RESULTS.md`` has the speed).
"""

from __future__ import annotations

import pytest
import torch
from torch._inductor import config as inductor_config

from memopt_func import rules
from memopt_func.compiled import Stepper, cpu_codegen

CPU = torch.device("cpu")
FLAG = {"cpp.march": "native -mprefer-vector-width=512"}
# Inductor's cpp.march (torch 2.13 has it, 2.11 does not): without it there is no flag to give
HAS_MARCH = hasattr(inductor_config.cpp, "march")
EXPECTED = FLAG if HAS_MARCH else {}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")  # tests/conftest.py


@pytest.fixture
def avx512_gcc(monkeypatch):
    """This process seen as an x86-64 Linux machine with 512-bit Inductor vectors and g++."""
    monkeypatch.setattr(cpu_codegen.sys, "platform", "linux")
    monkeypatch.setattr(cpu_codegen.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(cpu_codegen, "_vector_bits", lambda: 512)
    monkeypatch.setattr(cpu_codegen, "_compiler_takes_flag", lambda: True)


def test_flag_on_a_512_bit_cpu(avx512_gcc):
    assert cpu_codegen.inductor_options(CPU) == EXPECTED


@pytest.mark.parametrize("device", ["cuda", "meta"])
def test_no_flag_off_the_cpu(avx512_gcc, device):
    assert cpu_codegen.inductor_options(torch.device(device)) == {}


def test_no_flag_with_narrower_vectors_or_another_compiler(avx512_gcc, monkeypatch):
    monkeypatch.setattr(cpu_codegen, "_vector_bits", lambda: 256)
    assert cpu_codegen.inductor_options(CPU) == {}
    monkeypatch.setattr(cpu_codegen, "_vector_bits", lambda: 512)
    monkeypatch.setattr(cpu_codegen, "_compiler_takes_flag", lambda: False)
    assert cpu_codegen.inductor_options(CPU) == {}


@pytest.mark.parametrize("machine", ["aarch64", "ppc64le"])
def test_no_flag_on_other_architectures(avx512_gcc, monkeypatch, machine):
    monkeypatch.setattr(cpu_codegen.platform, "machine", lambda: machine)
    assert cpu_codegen.inductor_options(CPU) == {}


@pytest.mark.skipif(not HAS_MARCH, reason="this torch's Inductor has no cpp.march")
def test_the_process_own_choices_are_kept(avx512_gcc, monkeypatch):
    """A cpp.march set for the process (TORCHINDUCTOR_CPP_MARCH) or a simdlen other than 512 is
    the user's choice: no flag is added over it."""
    with inductor_config.patch({"cpp.march": "skylake-avx512"}):
        assert cpu_codegen.inductor_options(CPU) == {}
    with inductor_config.patch({"cpp.simdlen": 256}):
        assert cpu_codegen.inductor_options(CPU) == {}
    with inductor_config.patch({"cpp.simdlen": 512}):
        assert cpu_codegen.inductor_options(CPU) == FLAG


def test_stepper_compiles_with_the_flag_and_user_options_merge(avx512_gcc):
    params = [torch.randn(4, 3)]
    stepper = Stepper(rules.Adam_C(topC=2), params)
    assert stepper._compile_options == {
        "fullgraph": True,
        "dynamic": False,
        "options": {"emulate_precision_casts": True, **EXPECTED},
    }
    own = Stepper(rules.Adam_C(topC=2), [torch.randn(4, 3)], compile_options={"options": {"cpp.simdlen": 256}})
    assert own._compile_options["options"] == {"emulate_precision_casts": True, **EXPECTED, "cpp.simdlen": 256}
    if HAS_MARCH:
        own = Stepper(rules.Adam_C(topC=2), [torch.randn(4, 3)], compile_options={"options": {"cpp.march": "native"}})
        assert own._compile_options["options"] == {"emulate_precision_casts": True, "cpp.march": "native"}
    # torch.compile refuses a mode beside options: the mode comes in as its options
    mode = "max-autotune-no-cudagraphs"
    more = Stepper(rules.Adam(), [torch.randn(4, 3)], compile_options={"mode": mode})
    assert "mode" not in more._compile_options
    assert more._compile_options["options"] == {
        **torch._inductor.list_mode_options(mode),
        "emulate_precision_casts": True,
        **EXPECTED,
    }
    more.step([torch.randn(4, 3)], lr=1e-3)


def test_an_uncompiled_stepper_asks_for_no_options(monkeypatch):
    def asked(device):
        raise AssertionError("an uncompiled stepper looked up compile options")

    monkeypatch.setattr(cpu_codegen, "inductor_options", asked)
    stepper = Stepper(rules.Adam_C(topC=2), [torch.randn(4, 3)], compile=False)
    stepper.step([torch.randn(4, 3)], lr=1e-3)
    assert stepper._compile_options["options"] == {"emulate_precision_casts": True}


def test_the_flag_reaches_the_compiler(monkeypatch, tmp_path):
    """The option is not only passed: Inductor's C++ compile command of a stepper's kernel carries
    ``-mprefer-vector-width=512`` (a fresh cache and one compile thread, so the compile runs here)."""
    if not cpu_codegen.inductor_options(CPU):
        pytest.skip("this CPU or compiler does not get the flag")
    from torch._inductor import cpp_builder

    commands = []
    compile_now = cpp_builder.run_compile_cmd

    def recorded(cmd_line, cwd):
        commands.append(cmd_line)
        return compile_now(cmd_line, cwd)

    monkeypatch.setattr(cpp_builder, "run_compile_cmd", recorded)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    with inductor_config.patch({"fx_graph_cache": False, "compile_threads": 1}):
        stepper = Stepper(rules.Adam_C(topC=2), [torch.randn(1237)])
        stepper.step([torch.randn(1237)], lr=1e-3)
    assert commands and all(cpu_codegen.PREFER_512 in c for c in commands)


# lengths with whole 16-element vectors and tails, so the vector loops and the scalar tails run
SHAPES = [(40, 33), (257,), (16,), (5,)]
CASES = {
    "Adam_C": dict(topC=3, weight_decay=0.1),
    "Adam_CM": dict(topC=3, amsgrad=True),
    "RMSprop_C": dict(topC=3, momentum=0.5),
    "SGD_C": dict(topC=3, momentum=0.9, critical_test=0.3),
    "Adam_C, bfloat16 slots": dict(topC=3, buffer_dtype=torch.bfloat16),
}


def _run(rule, march: str, steps: int = 7):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    stepper = Stepper(rule, params, compile_options={"options": {"cpp.march": march}})
    for k in range(steps):
        gen = torch.Generator().manual_seed(100 + k)
        scale = 10.0 ** (3 - k)  # the scale falls, so replaced slots move the float64 sums
        stepper.step([scale * torch.randn(s, generator=gen) for s in SHAPES], lr=1e-3 * (k + 1))
    return stepper


@pytest.mark.parametrize("case", list(CASES))
def test_the_flag_changes_no_number(case):
    """Compiled with ``-mprefer-vector-width=512`` and without it, a critical rule's steps (whose
    kernels widen float32 slots into float64 sums) are bit-identical: params, slots, sums, keys."""
    if not cpu_codegen.inductor_options(CPU):
        pytest.skip("this CPU or compiler does not get the flag")
    name = case.split(",")[0]
    rule = rules.RULES[name](**CASES[case])
    with_flag = _run(rule, FLAG["cpp.march"])
    torch._dynamo.reset()
    without = _run(rule, "native")
    for a, b in zip(with_flag.params, without.params):
        assert torch.equal(a, b)
    got, want = with_flag.per_tensor_state().critical, without.per_tensor_state().critical
    assert all(torch.equal(a, b) for a, b in zip(got.buf, want.buf))
    assert all(torch.equal(a, b) for a, b in zip(got.buf_sum, want.buf_sum))
    assert torch.equal(got.keys, want.keys) and torch.equal(got.count, want.count)
    # the float64 sums moved: the check covers the widening, not only untouched zeros
    assert all(bool(s.abs().sum() > 0) for s in got.buf_sum)
