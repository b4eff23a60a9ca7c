"""The library's structure: no import circles, no underscored name taken from another module, every
state type's fields declared (``memopt_func.schema``), and every planted mutant's site present."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree

from memopt_func import rules, schema, storage
from memopt_func.groups import explode

NAMED = sorted(rules.RULES)
COMBINED = ["AdEMAMix+buffer", "AdamW+buffer", "RMSprop+buffer"]


def make_rule(name: str, hyper: dict):
    """A named rule, or "<Base>+buffer": the critical buffer over a base rule."""
    if name.endswith("+buffer"):
        critical = {k: hyper.pop(k) for k in list(hyper) if k in ("buffer_dtype",)}
        return rules.with_critical_buffer(rules.RULES[name[: -len("+buffer")]](**hyper), **critical)
    return rules.RULES[name](**hyper)

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memopt_func"
#: package-private helper modules whose underscored names the library's modules may share
HELPERS = {"memopt_func._math", "memopt_func._tree", "memopt_func._hyper"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]):
    """(imported module, imported name or None) for every import of the package that runs, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    # imports under ``if TYPE_CHECKING:`` never run (annotations only): not part of the import graph
    typing_only = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "memopt_func":
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                yield (full, None) if full in modules else (target, alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "memopt_func":
                    yield alias.name, None


def test_no_import_circles_in_the_library():
    modules = _modules()
    edges = {n: {t for t, _ in _imports(n, p, modules) if t in modules and t != n} for n, p in modules.items()}
    # a package's __init__ importing its own submodules is how a package is made, not a circle
    for n in edges:
        edges[n] = {t for t in edges[n] if not (n in t and t.startswith(n + "."))}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for t in sorted(edges[n]):
            if state.get(t) == 1:
                circle = path[path.index(t):] + [t]
                pytest.fail("import circle: " + " -> ".join(circle))
            if t not in state:
                visit(t)
        path.pop()
        state[n] = 2

    for n in sorted(modules):
        if n not in state:
            visit(n)


def test_no_underscored_name_is_imported_across_modules():
    modules = _modules()
    taken = [
        f"{n} imports {target}.{name}"
        for n, p in modules.items()
        for target, name in _imports(n, p, modules)
        if name is not None and name.startswith("_") and not name.startswith("__") and target not in HELPERS
    ]
    assert not taken, taken


def _states(name: str):
    rule = make_rule(name, {})
    params = [torch.zeros(3, 2), torch.zeros(5)]
    return rule, rule.init(params)


def _nodes(state):
    yield state
    for field, f in schema.of(state).items():
        value = getattr(state, field)
        if f.role == schema.NESTED and value is not None:
            yield from _nodes(value)


@pytest.mark.parametrize("name", NAMED + COMBINED)
def test_every_state_field_is_declared_and_every_stored_one_has_a_stream(name):
    _, state = _states(name)
    for node in _nodes(state):
        declared = schema.of(node)
        assert list(declared) == list(node._fields)
        for field, f in declared.items():
            if f.role in (schema.MOMENT, schema.SLOTS):
                assert field in schema.STREAM_ID
            if f.role == schema.MOMENT:
                assert storage.MOMENTS[field] == f.kind


@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C"])
@pytest.mark.parametrize("synced", [True, False])
def test_row_fields_sit_with_the_first_parameter_of_a_synced_group(name, synced):
    rule = rules.RULES[name](synced=synced)
    state = rule.init([torch.zeros(3, 2), torch.zeros(5), torch.zeros(4)])
    entries = explode(state, 3, synced)
    rows = {"critical_keys", "critical_count", "critical_offers", "critical_accepted", "critical_nonfinite"}
    assert rows <= set(entries[0])
    for e in entries[1:]:
        assert (rows <= set(e)) is not synced and (not rows & set(e)) is synced


def test_declare_refuses_an_undeclared_field_and_a_stored_field_without_a_stream():
    class Partly(NamedTuple):
        step: torch.Tensor
        exp_avg: tuple

    with pytest.raises(TypeError, match="declare each field once"):
        schema.declare(step=schema.step())(Partly)

    class NewMoment(NamedTuple):
        step: torch.Tensor
        exp_avg_cube: tuple

    with pytest.raises(TypeError, match="no random stream id"):
        schema.declare(step=schema.step(), exp_avg_cube=schema.moment("signed"))(NewMoment)
    with pytest.raises(TypeError, match="declared square, elsewhere signed"):
        schema.declare(step=schema.step(), exp_avg=schema.moment("square"))(
            NamedTuple("Clash", [("step", torch.Tensor), ("exp_avg", tuple)])
        )
    with pytest.raises(TypeError, match="not a declared state type"):
        schema.of((1, 2))


def test_a_declared_moment_takes_state_dtype():
    """A moment is stored as ``state_dtype`` says because it is declared one, not because its
    name is on a list: every moment of every rule's state is stored narrow."""
    for name in NAMED + COMBINED:
        rule = make_rule(name, {"state_dtype": torch.bfloat16} if "state_dtype" in {h.name for h in make_rule(name, {}).HYPERS} else {})
        if rule.hyper.get("state_dtype") is None:
            continue
        state = rule.init([torch.zeros(3, 2), torch.zeros(5)])
        for node in _nodes(state):
            for field, f in schema.of(node).items():
                if f.role == schema.MOMENT:
                    for t in getattr(node, field):
                        assert t.dtype == torch.bfloat16, (name, field)


def test_every_planted_mutant_site_is_in_its_file_once():
    sys.path.insert(0, str(ROOT / "tests" / "mutants"))
    try:
        from mutants import MUTANTS
    finally:
        sys.path.pop(0)
    misses = [
        f"{m.id}: found {(ROOT / m.file).read_text().count(m.original)} times in {m.file}"
        for m in MUTANTS
        if (ROOT / m.file).read_text().count(m.original) != 1
    ]
    assert not misses, misses


def test_pytree_leaves_of_a_state_are_its_declared_tensors():
    """Every tensor of a state is under a declared field (nothing rides along undeclared)."""
    _, state = _states("Adam_CM")
    declared = [v for node in _nodes(state) for f, d in schema.of(node).items() if d.role != schema.NESTED for v in pytree.tree_leaves(getattr(node, f))]
    assert len(declared) == len(pytree.tree_leaves(state))


def test_every_rule_has_a_variant_in_the_example_tests():
    from helpers import RULE_VARIANTS
    from dropin_common import OPTIMIZERS

    assert set(rules.RULES) <= {name for name, _ in RULE_VARIANTS.values()}
    assert set(rules.registry.NAMED) <= set(OPTIMIZERS)


def test_a_rule_whose_state_type_is_not_declared_still_steps_with_a_deprecation_warning():
    """A rule written before ``schema.declare`` (its state a plain NamedTuple) steps as before:
    the roles are read off the field names, with a DeprecationWarning; a drop-in over it saves
    and loads its state."""
    from memopt_func import _math as M
    from memopt_func import _tree, optim
    from memopt_func._hyper import lr as lr_hyper
    from memopt_func._rule import Rule, advance, new_steps

    class OldState(NamedTuple):
        step: torch.Tensor
        exp_avg: tuple
        trace: tuple  # a per-leaf field no earlier rule had

    class OldRule(Rule):
        HYPERS = (lr_hyper(1e-2),)
        ELEMENTWISE = True

        def _init(self, leaves):
            return OldState(new_steps(leaves), M.zeros_like(leaves), M.zeros_like(leaves))

        def _update(self, params, grads, state, idx, h, ctx):
            m = M.ema(_tree.take(state.exp_avg, idx), grads, 0.9)
            trace = M.fe("add", _tree.take(state.trace, idx), grads)
            new = OldState(advance(state.step, idx), _tree.put(state.exp_avg, idx, m), _tree.put(state.trace, idx, trace))
            return M.axpy(params, -h["lr"], m), new

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]
    opt = optim.from_rule(params, OldRule(lr=0.1))
    with pytest.warns(DeprecationWarning, match="OldState is not a declared state type"):
        for _ in range(2):
            for p in params:
                p.grad = torch.full_like(p, 0.5)
            opt.step()
    assert sorted(opt.state[params[0]]) == ["exp_avg", "step", "trace"]
    assert torch.equal(opt.state[params[1]]["trace"], torch.full((2, 2), 1.0))
    assert torch.allclose(params[0].detach(), torch.full((3,), 1 - 0.1 * (0.05 + 0.095)))
    again = optim.from_rule([torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))], OldRule(lr=0.1))
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][1]]["trace"], torch.full((2, 2), 1.0))
