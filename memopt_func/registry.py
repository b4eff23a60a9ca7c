"""The named optimizers: one entry each, and everything else derived from it.

``RULES`` (``memopt_func.rules.RULES``) is torch.optim's four rules (Adam, AdamW, SGD, RMSprop)
plus every registered one. From a registered entry come the drop-in class
(``memopt_func.optim.<name>``, with the entry's positional order), its compiled twin
(``memopt_func.compiled.<name>``), the apps' catalog (``memopt-func demo --optimizers``), and the
test suites' tables of rules and drop-ins. A new rule is its rule file plus one ``register``
line below (CONTRIBUTING.md works one through).
"""

from __future__ import annotations

from typing import NamedTuple

from ._rule import Rule
from .adam import Adam, AdamW
from .adam_c import Adam_C
from .adam_cm import Adam_CM
from .ademamix import AdEMAMix
from .rmsprop import RMSprop
from .rmsprop_c import RMSprop_C
from .sgd import SGD
from .sgd_c import SGD_C


class Named(NamedTuple):
    """A registered optimizer: its name, rule class, the published constructor's positional
    order of hyperparameters (the rule's others follow, by position too), and the drop-in's
    docstring."""

    name: str
    rule: type[Rule]
    positional: tuple[str, ...]
    doc: str


TORCH_RULES: dict[str, type[Rule]] = {cls.__name__: cls for cls in (Adam, AdamW, SGD, RMSprop)}
"""The rules of torch.optim's optimizers (torch.optim is their drop-in)."""
NAMED: dict[str, Named] = {}
"""The registered optimizers by name, in registration order."""
RULES: dict[str, type[Rule]] = dict(TORCH_RULES)
"""Every rule class of the package by name: torch.optim's four, then the registered ones."""


def register(name: str, rule: type[Rule], positional: tuple[str, ...], doc: str) -> Named:
    """Register the optimizer ``name`` (a new name, a ``Rule`` subclass of the same name, and
    positional names among its hyperparameters); returns its entry."""
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(f"register({name!r}): rule must be a memopt_func Rule class, got {rule!r}")
    if not name.isidentifier() or name != rule.__name__:
        raise ValueError(f"register({name!r}): the name must be the rule class's name ({rule.__name__!r})")
    if name in RULES:
        raise ValueError(f"register({name!r}): {name} is already a rule ({RULES[name].__module__})")
    known = [h.name for h in rule.HYPERS]
    unknown = [n for n in positional if n not in known]
    if unknown or len(set(positional)) != len(positional):
        raise ValueError(f"register({name!r}): positional {positional} must name distinct hyperparameters of {name} ({known})")
    entry = NAMED[name] = Named(name, rule, tuple(positional), doc)
    RULES[name] = rule
    return entry


def unregister(name: str) -> None:
    """Remove a registered optimizer (a throwaway one, as the tests register)."""
    if name not in NAMED:
        raise ValueError(f"unregister({name!r}): not a registered optimizer ({sorted(NAMED)})")
    del NAMED[name], RULES[name]


_CMOPTIMIZER = ("lr", "betas", "eps", "decay", "kappa", "topC", "weight_decay", "amsgrad", "critical_test", "synced", "buffer_dtype")

register("Adam_C", Adam_C, _CMOPTIMIZER, 'Adam with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "Adam_C").')
register(
    "RMSprop_C", RMSprop_C,
    ("lr", "alpha", "eps", "weight_decay", "momentum", "centered", "decay", "kappa", "topC", "critical_test", "synced", "buffer_dtype"),
    'RMSprop with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "RMSprop_C").',
)
register(
    "SGD_C", SGD_C, ("lr", "kappa", "dampening", "weight_decay", "momentum", "decay", "topC", "critical_test", "synced", "buffer_dtype"),
    'SGD with critical gradients; the published ``cmoptimizer`` signature (SPEC.md, "SGD_C").',
)
register("Adam_CM", Adam_CM, _CMOPTIMIZER, 'Adam with critical momenta; the published ``cmoptimizer`` signature (SPEC.md, "Adam_CM").')
register(
    "AdEMAMix", AdEMAMix, ("lr", "betas", "alpha", "beta3_warmup", "alpha_warmup", "eps", "weight_decay"),
    'AdEMAMix; the signature of the paper\'s PyTorch reference (SPEC.md, "AdEMAMix").',
)

__all__ = ["Named", "TORCH_RULES", "NAMED", "RULES", "register", "unregister"]
