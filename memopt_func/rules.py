"""The functional update rules, one namespace: ``from memopt_func import rules``.

``rules.Adam_CM(lr=...)`` is the pure rule; ``memopt_func.Adam_CM`` is the drop-in
``torch.optim.Optimizer`` built on it.
"""

import torch

from . import registry
from ._critical import CriticalState, critical_class, register_critical, with_critical_buffer
from ._rule import Rule
from .adam import Adam, AdamState, AdamW
from .adam_c import Adam_C
from .adam_cm import Adam_CM
from .ademamix import AdEMAMix, AdEMAMixState
from .critical_buffer import CriticalBufferState
from .rmsprop import RMSprop, RMSpropState
from .rmsprop_c import RMSprop_C
from .sgd import SGD, SGDState
from .sgd_c import SGD_C

for _base, _critical in ((Adam, Adam_C), (RMSprop, RMSprop_C), (SGD, SGD_C)):
    register_critical(_base, _critical)

# States are NamedTuples of tensors: let torch.load(..., weights_only=True) rebuild them.
torch.serialization.add_safe_globals([AdamState, SGDState, RMSpropState, AdEMAMixState, CriticalState, CriticalBufferState])

RULES = registry.RULES
"""The package's rule classes by name (``memopt_func.registry``: torch.optim's four, then every
registered optimizer's)."""


def __getattr__(name: str):
    """A registered rule without a line above (``registry.register``) by its name."""
    if name in registry.NAMED:
        return registry.NAMED[name].rule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Rule",
    "with_critical_buffer",
    "critical_class",
    "RULES",
    "Adam",
    "AdamW",
    "SGD",
    "RMSprop",
    "Adam_C",
    "RMSprop_C",
    "SGD_C",
    "Adam_CM",
    "AdEMAMix",
    "AdamState",
    "SGDState",
    "RMSpropState",
    "AdEMAMixState",
    "CriticalState",
    "CriticalBufferState",
]
