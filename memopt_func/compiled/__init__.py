"""memopt_func.compiled: fast stepping for memopt_func rules and drop-in optimizers.

``Stepper(rule, params)`` runs a functional rule as one compiled, in-place step over persistent
state (flat buffers, no recompiles as hyperparameters change, CUDA graphs on GPU).
"""

from .flat import FlatLayout
from .stepper import Stepper

__all__ = ["Stepper", "FlatLayout"]

from memopt_func import registry

from . import optim
from .optim import AdEMAMix, Adam_C, Adam_CM, CompiledOptimizer, RMSprop_C, SGD_C, compile_optimizer  # noqa: E402

__all__ += ["compile_optimizer", "CompiledOptimizer", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"]


def __getattr__(name: str):
    """The compiled twin of a registered optimizer (``memopt_func.registry``) by its name."""
    if name in registry.NAMED:
        return getattr(optim, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
