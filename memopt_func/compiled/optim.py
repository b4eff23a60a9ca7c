"""Compiled drop-in optimizers: the classes of ``memopt_func.optim`` stepping through ``Stepper``.

``compiled.Adam_CM(model.parameters(), lr=...)`` takes the published signature plus ``flat`` and
``cuda_graph``; ``compile_optimizer(opt)`` turns an existing drop-in (state included) into its
compiled twin. Per param group one ``Stepper`` owns flat parameter, gradient and state buffers;
``opt.state`` holds per-parameter views into them, so ``state_dict()`` and LR schedulers work as
usual, and changing ``lr`` (or any per-step hyperparameter) never recompiles.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from memopt_func import optim as eager
from memopt_func.optim import MemoryOptimizer, explode

from .stepper import Stepper


class CompiledOptimizer(MemoryOptimizer):
    """Mixin over a ``MemoryOptimizer``: every param group steps through a compiled ``Stepper``."""

    def __init__(self, params: Any, *args: Any, flat: bool | None = None, cuda_graph: bool | None = None, **kwargs: Any):
        self._flat = flat
        self._cuda_graph = cuda_graph
        self._steppers: dict[int, Stepper] = {}
        super().__init__(params, *args, **kwargs)

    def _stepper(self, index: int, group: dict[str, Any]) -> Stepper:
        rule = self._rule(group)
        stepper = self._steppers.get(index)
        if stepper is not None and stepper.rule is rule and stepper._leaves == group["params"]:
            return stepper
        params = group["params"]
        state = self._group_state(group, rule) if self.state.get(params[0]) else None
        stepper = Stepper(rule, list(params), state=state, flat=self._flat, cuda_graph=self._cuda_graph)
        for p, entry in zip(params, explode(stepper.per_tensor_state(), len(params), self._synced(rule))):
            self.state[p] = entry
        self._steppers[index] = stepper
        return stepper

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._evaluate(closure)
        for index, group in enumerate(self.param_groups):
            if all(p.grad is None for p in group["params"]):
                continue
            stepper = self._stepper(index, group)
            stepper.step(None, **{name: group[name] for name in stepper.rule.dynamic_names()})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Flat groups zero their gradient buffer in place (so backward accumulates straight into
        it); other groups follow ``torch.optim.Optimizer.zero_grad``."""
        stepped = set()
        for index, stepper in self._steppers.items():
            if stepper.flat:
                stepper.zero_grad()
                stepped.update(id(p) for p in self.param_groups[index]["params"])
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in stepped or p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().requires_grad_(False).zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._steppers = {}  # the next step adopts the loaded state


def _compiled_class(cls: type[MemoryOptimizer]) -> type[CompiledOptimizer]:
    return type(cls.__name__, (CompiledOptimizer, cls), {"__doc__": f"Compiled {cls.__name__}: {cls.__doc__}", "__module__": __name__})


Adam_CM = _compiled_class(eager.Adam_CM)
Adam_C = _compiled_class(eager.Adam_C)
RMSprop_C = _compiled_class(eager.RMSprop_C)
SGD_C = _compiled_class(eager.SGD_C)
AdEMAMix = _compiled_class(eager.AdEMAMix)

_BY_EAGER = {eager.Adam_CM: Adam_CM, eager.Adam_C: Adam_C, eager.RMSprop_C: RMSprop_C, eager.SGD_C: SGD_C, eager.AdEMAMix: AdEMAMix}


def compile_optimizer(opt: MemoryOptimizer, *, flat: bool | None = None, cuda_graph: bool | None = None) -> CompiledOptimizer:
    """The compiled twin of a drop-in optimizer, with its param groups and state."""
    cls = _BY_EAGER.get(type(opt))
    if cls is None:
        raise TypeError(f"compile_optimizer takes a memopt_func drop-in optimizer, got {type(opt).__name__}")
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": g["params"]} for g in opt.param_groups]
    twin = cls(groups, flat=flat, cuda_graph=cuda_graph, **{h.name: opt.defaults[h.name] for h in cls.RULE.HYPERS})
    twin.load_state_dict(opt.state_dict())
    return twin


__all__ = ["CompiledOptimizer", "compile_optimizer", "Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix"]
