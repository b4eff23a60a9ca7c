"""The optimizers the command line and the benchmarks know by name, and how to build each.

Two families share one namespace: the ``torch.optim`` baselines (``Adam``, ``AdamW``, ``SGD``,
``RMSprop``, built with ``foreach=True``) and this package's drop-ins (``memopt_func.optim``).
The same names are the keys of ``memopt_func.rules.RULES``, so a functional experiment can take
the matching pure rule.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .. import optim as dropin
from .. import registry

TORCH_OPTIM = tuple(registry.TORCH_RULES)
MEMORY = tuple(registry.NAMED)  # every registered optimizer (``memopt_func.registry``), at import
NAMES = TORCH_OPTIM + MEMORY

# What the demo and the benchmark compare unless told otherwise.
DEFAULT = ("Adam", "AdamW", "Adam_CM", "Adam_C", "SGD_C", "RMSprop_C", "AdEMAMix")


def parse_names(text: str, valid: Iterable[str] = NAMES) -> list[str]:
    """``"Adam,Adam_CM"`` -> ``["Adam", "Adam_CM"]``; case-insensitive, order kept, duplicates dropped.

    Raises ``ValueError`` naming the unknown entries and listing the valid names.
    """
    valid = list(valid)
    by_lower = {n.lower(): n for n in valid}
    names, unknown = [], []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name = by_lower.get(part.lower())
        if name is None:
            unknown.append(part)
        elif name not in names:
            names.append(name)
    if unknown:
        raise ValueError(f"unknown optimizer(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(valid)}")
    if not names:
        raise ValueError(f"no optimizer named; valid names: {', '.join(valid)}")
    return names


def defaults(name: str) -> dict[str, Any]:
    """The hyperparameters the optimizer ``name`` takes by keyword, with their defaults (its
    rule's, for a drop-in; the torch.optim constructor's, for a baseline)."""
    if name in registry.NAMED:
        return {h.name: h.default for h in registry.NAMED[name].rule.HYPERS}
    if name in TORCH_OPTIM:
        import inspect

        return {n: p.default for n, p in inspect.signature(getattr(torch.optim, name)).parameters.items() if n != "params"}
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")


def constructor_names(name: str) -> list[str]:
    """The hyperparameters the optimizer ``name`` takes by keyword (``defaults``' keys)."""
    return list(defaults(name))


def is_memory(name: str) -> bool:
    """True for this package's drop-ins, False for the torch.optim baselines."""
    return name in registry.NAMED


#: Storage settings by name: (state_dtype, buffer_dtype) (``memopt_func.storage``).
STORAGE = {
    "fp32": (None, None),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "int8": (torch.int8, torch.int8),
}


def make_optimizer(
    name: str, params: Iterable[torch.Tensor] | list[dict[str, Any]], storage: str = "fp32", **hyper: Any
) -> torch.optim.Optimizer:
    """A fresh optimizer ``name`` over ``params``: torch.optim (foreach) or this package's drop-in.
    A ``storage`` other than fp32 keeps the state narrower (``STORAGE``): a drop-in takes it as
    ``state_dtype`` (and ``buffer_dtype``), and a torch.optim name becomes this package's rule of
    that name (``rules.AdamW`` ...) stepped through ``optim.from_rule`` with that ``state_dtype``."""
    if storage not in STORAGE:
        raise ValueError(f"unknown storage {storage!r}; valid: {', '.join(STORAGE)}")
    state_dtype, buffer_dtype = STORAGE[storage]
    if name in TORCH_OPTIM:
        if storage == "fp32":
            return getattr(torch.optim, name)(params, foreach=True, **hyper)
        from .. import rules

        return dropin.from_rule(params, rules.RULES[name](**hyper, state_dtype=state_dtype))
    if storage != "fp32" and {"state_dtype", "buffer_dtype"} & set(hyper):
        raise ValueError(f"storage {storage!r} sets state_dtype and buffer_dtype; give them either through it or one by one, not both")
    if name in registry.NAMED:
        if storage != "fp32":
            hyper = {**hyper, "state_dtype": state_dtype}
            if "buffer_dtype" in {h.name for h in registry.NAMED[name].rule.HYPERS}:
                hyper["buffer_dtype"] = buffer_dtype
        return getattr(dropin, name)(params, **hyper)
    raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(NAMES)}")
