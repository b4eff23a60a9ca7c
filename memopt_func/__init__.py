"""memopt-func: functional, compile-first memory-augmented optimizers for PyTorch.

Two ways in, one set of formulas:

* drop-in ``torch.optim`` optimizers with the published signatures::

      from memopt_func import Adam_CM            # also memopt_func.optim.Adam_CM
      opt = Adam_CM(model.parameters(), lr=1e-3, topC=5, decay=0.7)

* pure update rules over pytrees of tensors (``memopt_func.rules``)::

      from memopt_func import rules
      rule = rules.Adam_CM(lr=1e-3, topC=5, decay=0.7)
      state = rule.init(params)                          # params: any pytree of tensors
      params, state = rule.step(params, grads, state)    # pure: inputs are never mutated

SPEC.md in the project defines the exact numbers each rule computes. Speed machinery
(torch.compile, CUDA graphs, flat buffers) lives in the subpackage ``memopt_func.compiled``.
"""

from . import optim, registry, rules
from .optim import AdEMAMix, Adam_C, Adam_CM, MemoryOptimizer, RMSprop_C, SGD_C, from_rule
from ._scratch import Scratch
from .rules import RULES, Rule
from . import compiled  # noqa: E402,F401  (registers the flat stepping torch.compile(opt.step) hands over to)

__all__ = ["optim", "rules", "RULES", "Rule", "Scratch", "MemoryOptimizer", "from_rule", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"]

__version__ = "0.2.0"


def __getattr__(name: str):
    """The drop-in of a registered optimizer (``memopt_func.registry``) by its name."""
    if name in registry.NAMED:
        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
