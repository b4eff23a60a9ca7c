"""Golden checkpoints: state_dicts written by earlier versions of memopt_func, with each version's
own continuation of the run, so that today's code can be shown to resume them.

Each case steps a drop-in optimizer ``BEFORE`` steps over a fixed gradient stream, saves its
``state_dict`` (and the parameters), then steps ``AFTER`` more and keeps the parameters it reaches.
``tests/test_golden_checkpoints.py`` loads the saved state_dict into today's optimizer, steps the
same ``AFTER`` steps and compares.

The gradient stream and the starting parameters are integer hashes scaled by powers of two, so
they are exact in float64 on every machine and torch version (no generator, no transcendental).

Writing a version's corpus (run from a checkout of that version, whose ``memopt_func`` must be the
one imported; this file is read from today's tree)::

    git worktree add /tmp/old <commit>
    PYTHONPATH=/tmp/old python tests/golden_corpus.py --label <date>-<commit> --out tests/golden
"""

from __future__ import annotations

import argparse
import copy
import importlib
import math
import os
import sys

import torch

BEFORE, AFTER = 7, 4
HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden")

SMALL = [(6, 5), (7,), (1,)]
LARGE = [(4133,), (6, 5), (7,)]  # 4133: 8-bit state (>= 4096 elements) over a partial last block

# name: (class, constructor kwargs, shapes, how it steps, needs): ``compiled`` steps through the
# compiled drop-in; ``groups`` splits the parameters into two param groups (the second with lr/2);
# ``stepper`` steps a ``Stepper`` over the rule; ``needs`` are what a version must have for the
# case to exist there (hyperparameters, ``migrate``, ``Stepper.state_dict``).
CASES = {
    "adam_cm": ("Adam_CM", dict(lr=1e-2), SMALL, "eager", ()),
    "adam_cm-amsgrad-wd-unsynced": ("Adam_CM", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, synced=False, topC=3), SMALL, "eager", ()),
    "adam_cm-two-groups": ("Adam_CM", dict(lr=1e-2, topC=3), SMALL, "groups", ()),
    "adam_c-mean-kappa": ("Adam_C", dict(lr=1e-2, aggr="mean", kappa=0.5, topC=4), SMALL, "eager", ()),
    "adam_c-critical-test": ("Adam_C", dict(lr=1e-2, topC=2, critical_test=0.4, seed=7), SMALL, "eager", ()),
    "adam_c-float32-buffer": ("Adam_C", dict(lr=1e-2, topC=3, buffer_dtype=torch.float32), SMALL, "eager", ()),
    "rmsprop_c-momentum-centered": ("RMSprop_C", dict(lr=1e-3, momentum=0.5, centered=True, topC=3), SMALL, "eager", ()),
    "sgd_c-momentum": ("SGD_C", dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01, topC=3), SMALL, "eager", ()),
    "ademamix-warmups": ("AdEMAMix", dict(lr=1e-2, alpha_warmup=9, beta3_warmup=9, weight_decay=0.01), SMALL, "eager", ()),
    "compiled-adam_cm": ("Adam_CM", dict(lr=1e-2, topC=3), SMALL, "compiled", ()),
    "compiled-ademamix": ("AdEMAMix", dict(lr=1e-2), SMALL, "compiled", ()),
    "ademamix-bf16-state": ("AdEMAMix", dict(lr=1e-2, state_dtype=torch.bfloat16, seed=3), SMALL, "eager", ("state_dtype",)),
    "ademamix-int8-state": ("AdEMAMix", dict(lr=1e-2, state_dtype=torch.int8, seed=3), LARGE, "eager", ("state_dtype",)),
    "adam_cm-bf16-state-and-buffer": (
        "Adam_CM", dict(lr=1e-2, topC=3, state_dtype=torch.bfloat16, buffer_dtype=torch.bfloat16), SMALL, "eager", ("state_dtype",),
    ),
    "adam_cm-int8-state-and-buffer": (
        "Adam_CM", dict(lr=1e-2, topC=3, state_dtype=torch.int8, buffer_dtype=torch.int8), LARGE, "eager", ("state_dtype",),
    ),
    "migrated-adam_c": ("Adam_C", dict(lr=1e-2, topC=3, weight_decay=0.01), SMALL, "migrated", ("migrate",)),
    "stepper-adam_c": ("Adam_C", dict(lr=1e-2, topC=3), SMALL, "stepper", ("Stepper.state_dict",)),
    "stepper-ademamix-bf16-state": (
        "AdEMAMix", dict(lr=1e-2, state_dtype=torch.bfloat16, seed=3), SMALL, "stepper", ("Stepper.state_dict",),
    ),
}


def _hash(n: int, a: int, b: int) -> torch.Tensor:
    idx = torch.arange(n, dtype=torch.int64)
    return (idx * 2654435761 + a * 40503 + b * 9973) % 65536


def initial_params(shapes) -> list[torch.Tensor]:
    """Parameters in [-1, 1), multiples of 2**-15."""
    return [((_hash(math.prod(s), 1000, i) - 32768).double() / 32768).reshape(s) for i, s in enumerate(shapes)]


def gradient(step: int, index: int, shape, skips: bool = True) -> torch.Tensor | None:
    """Parameter ``index``'s gradient at step ``step`` (0-based): with ``skips``, None now and then
    (a skipped tensor), and a scale that changes by powers of two so that offers are admitted and
    refused."""
    if skips and index == 2 and step % 3 == 1:
        return None
    g = (_hash(math.prod(shape), step + 1, index) - 32768).double() / 32768
    return (g * 2.0 ** -(step % 4 if index else (step * 3) % 5)).reshape(shape)


def skipping(how: str) -> bool:
    """Whether a case's gradient stream skips tensors: not for compiled drop-ins, whose flat
    steppers took a gradient for every tensor before 2026-11-30, nor for a published run (its
    synced buffer is per tensor, and the rows of tensors that missed steps no longer agree), nor
    for a ``Stepper`` (a flat one steps every tensor)."""
    return how not in ("compiled", "migrated", "stepper")


def run(opt, params, steps: range, skips: bool = True) -> None:
    """``steps`` steps of the gradient stream."""
    for k in steps:
        for i, p in enumerate(params):
            g = gradient(k, i, p.shape, skips)
            p.grad = None if g is None else g.to(p.dtype)
        opt.step()


def relative_errors(params, old) -> list[float]:
    """Per parameter, max |new - old| / max |old|: how far a resumed run ended from the old one's."""
    return [float((new.detach() - o).abs().max() / o.abs().max().clamp(min=1e-300)) for new, o in zip(params, old)]


class SteppingLoop:
    """A ``Stepper`` with the optimizer's ``step()`` and ``state_dict()`` (what ``run`` calls)."""

    def __init__(self, stepper):
        self.stepper = stepper

    def step(self):
        self.stepper.step()

    def state_dict(self):
        return self.stepper.state_dict()

    def load_state_dict(self, state_dict):
        self.stepper.load_state_dict(state_dict)


def make_stepper(rules, compiled, name, params, kwargs, compile=True):
    return SteppingLoop(compiled.Stepper(getattr(rules, name)(**kwargs), params, compile=compile))


def make_optimizer(cls, params, kwargs, how):
    if how == "groups":
        half = len(params) // 2 + 1
        return cls([{"params": params[:half]}, {"params": params[half:], "lr": kwargs["lr"] / 2}], **kwargs)
    return cls(params, **kwargs)


def _modules():
    import memopt_func.optim as optim

    root = os.path.dirname(os.path.abspath(optim.__file__))
    try:
        compiled = importlib.import_module("memopt_func.compiled")
    except ImportError:
        compiled = None
    if compiled is None or not os.path.abspath(compiled.__file__).startswith(root):
        # before 2026-11-30 a top-level package (an editable install of a later tree would
        # otherwise answer for memopt_func.compiled)
        compiled = importlib.import_module("compiled")
    return optim, compiled


def _own_module(name, optim):
    """The module ``name`` of the tree ``optim`` comes from, or None where that tree lacks it."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    root = os.path.dirname(os.path.abspath(optim.__file__))
    return module if os.path.abspath(module.__file__).startswith(root) else None


def write_case(name: str, label: str, out: str) -> str | None:
    optim, compiled = _modules()
    cls_name, kwargs, shapes, how, needs = CASES[name]
    cls = getattr(compiled if how == "compiled" else optim, cls_name)
    hypers = {h.name for h in cls.RULE.HYPERS}
    if "migrate" in needs:
        migrate = _own_module("memopt_func.migrate", optim)
        if migrate is None:
            return None
    if "Stepper.state_dict" in needs and not hasattr(compiled.Stepper, "state_dict"):
        return None
    if any(n not in hypers for n in needs if "." not in n and n != "migrate") or any(k not in hypers for k in kwargs):
        return None
    params = [torch.nn.Parameter(p) for p in initial_params(shapes)]
    skips = skipping(how)
    if how == "migrated":
        sys.path.insert(0, HERE)
        from published_layout import PUBLISHED

        pub = PUBLISHED[cls_name](params, **kwargs)
        run(pub, params, range(BEFORE), skips)
        opt = cls(params, **kwargs)
        migrate.load_published(opt, copy.deepcopy(pub.state_dict()))
        run(opt, params, range(BEFORE, BEFORE + 1), skips)
        before = BEFORE + 1
    else:
        if how == "stepper":
            opt = make_stepper(_own_module("memopt_func.rules", optim), compiled, cls_name, params, kwargs)
        else:
            opt = make_optimizer(cls, params, kwargs, how)
        run(opt, params, range(BEFORE), skips)
        before = BEFORE
    saved = copy.deepcopy(opt.state_dict())
    at_save = [p.detach().clone() for p in params]
    run(opt, params, range(before, before + AFTER), skips)
    case = {
        "label": label,
        "case": name,
        "class": cls_name,
        "how": how,
        "kwargs": kwargs,
        "shapes": shapes,
        "before": before,
        "after": AFTER,
        "torch": str(torch.__version__),
        "state_dict": saved,
        "params_at_save": at_save,
        "params_after": [p.detach().clone() for p in params],
    }
    os.makedirs(os.path.join(out, label), exist_ok=True)
    path = os.path.join(out, label, f"{name}.pt")
    torch.save(case, path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", required=True, help="the corpus folder: <date>-<commit>")
    parser.add_argument("--out", default=GOLDEN)
    parser.add_argument("--expect-root", help="fail unless memopt_func is imported from under this folder")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import memopt_func

    where = os.path.dirname(os.path.abspath(memopt_func.__file__))
    print(f"memopt_func from {where}")
    if args.expect_root and not where.startswith(os.path.abspath(args.expect_root)):
        raise SystemExit(f"memopt_func came from {where}, not from {args.expect_root}")
    for name in CASES:
        path = write_case(name, args.label, args.out)
        print(f"{name}: {path or 'not in this version'}")


if __name__ == "__main__":
    main()
