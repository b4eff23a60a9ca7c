"""Continue here a run started with the published optimizers: their checkpoints in this package's layout.

The published ``cmoptimizer`` package (Adam_CM, Adam_C, RMSprop_C, SGD_C) and the PyTorch
reference of AdEMAMix save their state under other names and shapes than the drop-ins of
``memopt_func.optim``; SPEC.md ("Migrating checkpoints from the published implementations")
describes both layouts and the mapping. Typical use::

    from memopt_func import Adam_CM
    from memopt_func.migrate import load_published, read_published

    ckpt = read_published("run.pt")              # no cmoptimizer install needed
    model.load_state_dict(ckpt["model"])
    opt = Adam_CM(model.parameters())
    load_published(opt, ckpt["optimizer"])       # then opt.step() goes on where the run stopped

``convert_published`` gives the converted state_dict without loading it (to save it, say).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from . import critical_buffer as cb
from . import checkpoint
from .groups import explode, layout_value
from .optim import MemoryOptimizer

BUFFER_ENTRY = "critical gradients"
"""The per-parameter state entry of cmoptimizer that holds the critical buffer (a TensorList)."""
# Where cmoptimizer's TensorList class lives, as a pickled checkpoint names it.
_TENSORLIST = "cmoptimizer.prioritydict.TensorList"


class _Published(NamedTuple):
    """What a published optimizer class saves."""

    group_keys: tuple[str, ...]  # the hyperparameters its constructor puts in every param group
    dropped_group_keys: tuple[str, ...]  # group keys of theirs that carry nothing: not kept
    moments: dict[str, str]  # our per-parameter state key -> theirs
    has_step: bool  # a per-parameter Python int ``step``
    has_buffer: bool  # a per-parameter ``"critical gradients"`` TensorList


_ADAM = _Published(
    group_keys=("lr", "betas", "eps", "weight_decay", "amsgrad", "kappa", "topC", "decay", "critical_test", "synced", "buffer_dtype"),
    dropped_group_keys=(),
    moments={"exp_avg": "exp_avg", "exp_avg_sq": "exp_avg_sq", "max_exp_avg_sq": "max_exp_avg_sq"},
    has_step=True,
    has_buffer=True,
)

PUBLISHED: dict[str, _Published] = {
    "Adam_CM": _ADAM,
    "Adam_C": _ADAM,
    "RMSprop_C": _Published(
        # no critical_test: the published RMSprop_C has no random admission
        group_keys=("lr", "momentum", "alpha", "eps", "centered", "weight_decay", "kappa", "topC", "decay", "synced", "buffer_dtype"),
        dropped_group_keys=(),
        moments={"square_avg": "square_avg", "momentum_buffer": "momentum_buffer", "grad_avg": "grad_avg"},
        has_step=True,
        has_buffer=True,
    ),
    "SGD_C": _Published(
        group_keys=("lr", "kappa", "dampening", "weight_decay", "momentum", "decay", "topC", "critical_test", "synced", "buffer_dtype"),
        dropped_group_keys=("gradHist",),  # an always-empty dict in the published defaults
        moments={"momentum_buffer": "momentum_buffer"},
        has_step=False,
        has_buffer=True,
    ),
    "AdEMAMix": _Published(
        group_keys=("lr", "betas", "eps", "alpha", "beta3_warmup", "alpha_warmup", "weight_decay"),
        dropped_group_keys=(),
        moments={"exp_avg": "exp_avg_fast", "exp_avg_slow": "exp_avg_slow", "exp_avg_sq": "exp_avg_sq"},
        has_step=True,
        has_buffer=False,
    ),
}
"""The published layouts, by the name of the class (and of this package's drop-in) that saves them."""


class PublishedBuffer(dict):
    """Stands in for cmoptimizer's ``TensorList`` when ``read_published`` reads a checkpoint: an
    empty dict whose attributes are the pickled ones (``k``, ``curr_k``, ``_heap_key``, ``_heap``,
    ``aggr_sum``, ``decay_rate``, ``dtype``, ...). ``convert_published`` reads those."""


def read_published(f: Any, map_location: Any = None) -> Any:
    """``torch.load`` (with ``weights_only=True``) of a checkpoint that holds a published
    optimizer's state_dict, without the published package installed: the pickled
    ``cmoptimizer.prioritydict.TensorList`` buffers come back as ``PublishedBuffer``\\ s. Returns
    whatever was saved (a state_dict, or your dict around one)."""
    with torch.serialization.safe_globals([(PublishedBuffer, _TENSORLIST)]):
        return torch.load(f, map_location=map_location, weights_only=True)


def load_published(optimizer: MemoryOptimizer, state_dict: Mapping[str, Any]) -> None:
    """Load into ``optimizer`` a state_dict saved by the published optimizer of the same name
    (cmoptimizer's Adam_CM, Adam_C, RMSprop_C, SGD_C; the AdEMAMix reference): converted by
    ``convert_published``, then ``optimizer.load_state_dict``. Raises ``ValueError`` naming what
    does not fit; the optimizer is then left as it was."""
    optimizer.load_state_dict(convert_published(state_dict, optimizer))


def convert_published(state_dict: Mapping[str, Any], optimizer: MemoryOptimizer) -> dict[str, Any]:
    """A published optimizer's state_dict in the layout ``optimizer.load_state_dict`` takes.

    The published class is the one named like ``optimizer``'s (Adam_C and Adam_CM save the same
    layout, so their state_dicts cannot be told apart: pass the optimizer of the class that saved
    it). Param groups keep their values (the published run's hyperparameters win, as in any
    ``load_state_dict``); hyperparameters the published class has no key for take
    ``optimizer``'s constructor values. Per parameter: the moments and ``step`` as they are; the
    buffer's slots, priorities and filled count as they are; ``buf_sum`` summed afresh from the
    filled slots; ``offers`` and ``accepted`` start at the filled count and ``nonfinite`` at 0 (the
    published state keeps no such counters); SGD_C's ``step``, which the published SGD_C does not
    keep, starts at the filled count (1 without a buffer): non-zero once the parameter has
    stepped, which is all SGD_C reads from it. ``optimizer`` is not changed.
    """
    if not isinstance(optimizer, MemoryOptimizer):
        raise TypeError(f"convert_published takes a memopt_func optimizer, got {type(optimizer).__name__}")
    name = optimizer.RULE.__name__
    layout = PUBLISHED.get(name)
    if layout is None:
        raise TypeError(f"no published layout is known for {type(optimizer).__name__}")
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("a published state_dict is a dict with 'state' and 'param_groups' (optimizer.state_dict())")
    if checkpoint.KEY in state_dict:
        theirs = state_dict[checkpoint.KEY].get("rule") if isinstance(state_dict[checkpoint.KEY], Mapping) else None
        raise ValueError(
            f"this state_dict was saved by memopt_func's {theirs}, not by the published package; "
            "load it with optimizer.load_state_dict"
        )
    groups = list(state_dict["param_groups"])
    if len(groups) != len(optimizer.param_groups):
        raise ValueError(
            f"the published state_dict has {len(groups)} param group(s), {type(optimizer).__name__} has "
            f"{len(optimizer.param_groups)}"
        )
    saved = state_dict["state"]
    out_state: dict[Any, dict[str, Any]] = {}
    out_groups = []
    for index, (theirs, ours) in enumerate(zip(groups, optimizer.param_groups)):
        group, entries = _convert_group(index, theirs, ours["params"], saved, layout, optimizer)
        out_groups.append(group)
        out_state.update(entries)
    return {"state": out_state, "param_groups": out_groups, checkpoint.KEY: checkpoint.header(name)}


def _convert_group(index, theirs, params, saved, layout, optimizer):
    name = optimizer.RULE.__name__
    where = f"param group {index} of the published {name} state_dict"
    missing = [k for k in layout.group_keys if k not in theirs]
    if missing:
        raise ValueError(f"{where} lacks {missing}: it was not saved by the published {name}")
    ids = list(theirs["params"])
    if len(ids) != len(params):
        raise ValueError(f"{where} has {len(ids)} parameters; the optimizer's group {index} has {len(params)}")
    if any(p.is_complex() for p in params):
        raise ValueError(
            f"{where}: complex parameters are not migrated (the published optimizers step them as complex "
            "tensors, whose state has no counterpart in this package's real-view state)"
        )
    group = {k: v for k, v in theirs.items() if k not in layout.dropped_group_keys}
    names = [h.name for h in optimizer.RULE.HYPERS]
    for n in names:
        group.setdefault(n, optimizer.defaults[n])
    try:
        rule = optimizer.RULE(**{n: layout_value(group[n]) for n in names})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
    synced = optimizer.groups.synced(rule)
    wanted = explode(rule.init([torch.empty_like(p, device="meta") for p in params]), len(params), synced)
    buffered = any(k.startswith("critical_") for w in wanted for k in w)
    known = set(layout.moments.values()) | ({"step"} if layout.has_step else set()) | ({BUFFER_ENTRY} if layout.has_buffer else set())

    entries: dict[int, dict[str, Any]] = {}
    slots: dict[int, tuple[Tensor, int, Tensor]] = {}  # position -> (keys [C], count, slots [C, *shape])
    for j, (pid, p) in enumerate(zip(ids, params)):
        entry = saved.get(pid)
        if not entry:
            continue
        at = f"{where}, parameter {pid}"
        unknown = sorted(set(entry) - known, key=str)
        if unknown:
            raise ValueError(f"{at} holds {unknown}, which the published {name} does not keep")
        entries[j] = _convert_moments(at, entry, wanted[j], p, layout, rule)
        if buffered:
            if BUFFER_ENTRY not in entry:
                raise ValueError(f"{at} has no {BUFFER_ENTRY!r} buffer, which the group's settings need")
            slots[j] = _read_buffer(at, entry[BUFFER_ENTRY], p, group)
        elif BUFFER_ENTRY in entry and _buffer_fields(at, entry[BUFFER_ENTRY]).get("curr_k", 0):
            raise ValueError(f"{at} holds a filled {BUFFER_ENTRY!r} buffer, but the group has kappa=0 or topC=0")
        if "step" in wanted[j] and "step" not in entries[j]:
            # SGD_C keeps none: the filled count, else 1 (a parameter with saved state has stepped)
            count = float(slots[j][1]) if j in slots else 1.0
            entries[j]["step"] = torch.tensor(count, dtype=torch.float64, device=p.device)
    if not entries:
        return group, {}

    if buffered:
        rows = _rows(where, slots, synced, params)
        for j, (pid, p) in enumerate(zip(ids, params)):
            if j not in entries:  # never stepped by the published run: a fresh state, as here
                entries[j] = {k: torch.zeros(w.shape, dtype=w.dtype, device=p.device) for k, w in wanted[j].items()}
                continue
            _, count, buf = slots[j]
            top_c = buf.shape[0]
            entries[j]["critical_buf"] = buf
            entries[j]["critical_buf_sum"] = cb.slot_sum(buf, torch.tensor(count, device=buf.device), top_c, torch.float64)
        for j, row in rows.items():
            entries[j].update(row)
    else:
        for j, p in enumerate(params):
            if j not in entries:
                entries[j] = {k: torch.zeros(w.shape, dtype=w.dtype, device=p.device) for k, w in wanted[j].items()}
    return group, {ids[j]: entries[j] for j in range(len(ids))}


def _convert_moments(at, entry, want, p, layout, rule):
    """The parameter's own entries of ours but the buffer's: moments and (but SGD_C's) ``step``."""
    out: dict[str, Any] = {}
    for key, w in want.items():
        if key.startswith("critical_"):
            continue
        if key == "step":
            if layout.has_step:
                out["step"] = _step(at, entry.get("step"), p)
            continue
        src = layout.moments[key]
        value = entry.get(src)
        if value is None and key == "exp_avg" and rule.hyper.get("betas", (1,))[0] == 0:
            # AdEMAMix with beta1 == 0 keeps no fast EMA; its AdamW reduction (alpha == 0) has one,
            # which a step with beta1 == 0 overwrites with the gradient: zeros lose nothing
            value = torch.zeros(w.shape, dtype=w.dtype, device=p.device)
        if value is None:
            raise ValueError(f"{at} lacks {src!r}, which the group's settings need")
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(w.shape):
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{at}: {src!r} is {shape}; the parameter's shape is {tuple(w.shape)}")
        out[key] = value.detach().to(device=p.device)
    return out


def _step(at, value, p):
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0:
        raise ValueError(f"{at}: 'step' is {value!r}; the published optimizers keep a step count (an int >= 0)")
    return torch.tensor(float(value), dtype=torch.float64, device=p.device)


def _buffer_fields(at, buffer) -> Mapping[str, Any]:
    """The attributes of a published TensorList (or a mapping of them, such as ``vars(buffer)``)."""
    if isinstance(buffer, Mapping) and "curr_k" in buffer:
        return buffer
    fields = getattr(buffer, "__dict__", None)
    if not isinstance(fields, Mapping) or "curr_k" not in fields or "k" not in fields:
        raise ValueError(
            f"{at}: {BUFFER_ENTRY!r} is a {type(buffer).__name__}, not the published TensorList "
            "(attributes k, curr_k, _heap_key, _heap)"
        )
    return fields


def _read_buffer(at, buffer, p, group) -> tuple[Tensor, int, Tensor]:
    """(keys [C], filled count, slots [C, *p.shape]) of a published buffer, checked against the group."""
    fields = _buffer_fields(at, buffer)
    top_c, count = fields["k"], fields["curr_k"]
    if top_c != group["topC"]:
        raise ValueError(f"{at}: its buffer has {top_c} slots; the group's topC is {group['topC']}")
    if not isinstance(count, int) or not 0 < count <= top_c:
        raise ValueError(f"{at}: its buffer's filled count is {count!r}; it must be in 1..{top_c}")
    keys, slots = fields.get("_heap_key"), fields.get("_heap")
    if not isinstance(keys, Tensor) or tuple(keys.shape) != (top_c,):
        raise ValueError(f"{at}: its buffer's priorities (_heap_key) are not a tensor of shape ({top_c},)")
    if not isinstance(slots, Tensor) or tuple(slots.shape) != (top_c, *p.shape):
        shape = tuple(slots.shape) if isinstance(slots, Tensor) else type(slots).__name__
        raise ValueError(f"{at}: its buffer's slots (_heap) are {shape}; the group needs {(top_c, *p.shape)}")
    if not bool(torch.isfinite(keys).all()):
        raise ValueError(
            f"{at}: its buffer holds a non-finite priority {keys.tolist()} (a NaN or infinite gradient was "
            "admitted); this package never keeps one"
        )
    rate, decay = fields.get("decay_rate"), group["decay"]
    if isinstance(rate, numbers.Real) and isinstance(decay, numbers.Real) and rate != decay:
        raise ValueError(
            f"{at}: its buffer decays priorities by {rate}, the group's decay is {decay}; the published run "
            "used the buffer's: set the group's decay to it before converting"
        )
    dtype = group["buffer_dtype"] or p.dtype
    if slots.dtype != dtype:
        raise ValueError(f"{at}: its buffer's slots are {slots.dtype}; the group's buffer_dtype needs {dtype}")
    return keys.detach().to(p.device), count, slots.detach().to(p.device).clone()


def _rows(where, slots, synced, params) -> dict[int, dict[str, Tensor]]:
    """The buffer rows' entries by position: the group row on the first parameter when synced (the
    published per-parameter copies of it must agree), else each parameter's own."""
    rows: dict[int, dict[str, Tensor]] = {}

    def row(keys: Tensor, count: int, device, shape) -> dict[str, Tensor]:
        n = torch.full(shape, count, dtype=torch.int64, device=device)
        return {
            "critical_keys": keys.reshape(*shape, -1).to(device),
            "critical_count": n,
            "critical_offers": n.clone(),
            "critical_accepted": n.clone(),
            "critical_nonfinite": torch.zeros_like(n),
        }

    if not synced:
        for j, (keys, count, _) in slots.items():
            rows[j] = row(keys, count, params[j].device, ())
        return rows
    first, (keys, count, _) = next(iter(slots.items()))
    for j, (k, c, _) in slots.items():
        if c != count or not torch.equal(k.to(keys.device), keys):
            raise ValueError(
                f"{where} is synced, but the published buffers of parameters {first} and {j} hold different "
                f"priorities or counts ({keys.tolist()}, {count} vs {k.tolist()}, {c}): some parameter missed "
                "steps, and one shared row cannot hold both"
            )
    rows[0] = row(keys, count, params[0].device, (1,))
    return rows


__all__ = ["BUFFER_ENTRY", "PUBLISHED", "PublishedBuffer", "convert_published", "load_published", "read_published"]
