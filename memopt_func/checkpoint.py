"""The drop-in optimizers' ``state_dict`` format: what each version wrote, and how a load reads
every one of them.

A drop-in's state_dict is torch.optim's (``state`` per parameter, ``param_groups``) plus one
entry, ``"memopt_func": {"rule": <rule name>, "format": FORMAT}``, naming the rule that wrote it
(a load into another optimizer is refused, naming both) and the format it was written in.

The formats, oldest first:

* 0 (0.1.0 until 2026-11-21): no ``"memopt_func"`` entry. Param groups lack ``maximize``,
  ``foreach``, ``state_dtype``, ``rounding``, ``param_rounding`` (and AdEMAMix's ``seed``); a
  critical buffer's per-parameter entries lack ``critical_nonfinite``.
* 1 (0.1.0, 2026-11-30 to 2026-12-01): the entry names the rule; every hyperparameter is saved;
  8-bit state as two plain tensors (codes, and block scales under ``<name>_absmax``).
* 2 (0.2.0): the entry also says its format.

Loading an older format fills what later formats added: a missing hyperparameter takes the
optimizer's default (as torch.optim does for ``maximize``, ``foreach`` and ``differentiable``),
a missing counter starts at zero. A hyperparameter that every format saved and that a param group
lacks means the state_dict is another optimizer's, and is refused. ``tests/golden/`` keeps a
state_dict of each format with the run its version made from it; every later version must
resume them.
"""

from __future__ import annotations

from typing import Any, Mapping

KEY = "memopt_func"
"""The state_dict entry that names the rule and the format."""
FORMAT = 2
"""The format this version writes."""
GROUP_KEYS_ADDED: dict[int, tuple[str, ...]] = {
    1: ("maximize", "foreach", "state_dtype", "rounding", "param_rounding", "seed"),
}
"""Hyperparameters (param group keys) by the format that first saved them; a load gives a group
without them the optimizer's defaults."""
ENTRIES_ADDED: dict[int, tuple[str, ...]] = {
    1: ("critical_nonfinite",),
}
"""Per-parameter state entries by the format that first saved them; a load starts them at zero."""

_OPTIONAL_GROUP_KEYS = frozenset(k for keys in GROUP_KEYS_ADDED.values() for k in keys)
_ZERO_ENTRIES = frozenset(k for keys in ENTRIES_ADDED.values() for k in keys)


def header(rule_name: str) -> dict[str, Any]:
    """The ``"memopt_func"`` entry a state_dict of ``rule_name``'s optimizer carries."""
    return {"rule": rule_name, "format": FORMAT}


def saved_format(state_dict: Mapping[str, Any]) -> int:
    """The format a state_dict was written in (0 for one without the ``"memopt_func"`` entry)."""
    entry = state_dict.get(KEY)
    if entry is None:
        return 0
    if not isinstance(entry, Mapping):
        raise ValueError(f"invalid state_dict[{KEY!r}]: {entry!r} (a dict with the rule's name and the format)")
    fmt = entry.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 0:
        raise ValueError(f"invalid state_dict[{KEY!r}]['format']: {fmt!r} (a non-negative int)")
    return fmt


def check_readable(state_dict: Mapping[str, Any], optimizer_name: str, rule_name: str) -> None:
    """Raise ValueError unless this version reads the state_dict into an optimizer of ``rule_name``."""
    fmt = saved_format(state_dict)
    if fmt > FORMAT:
        raise ValueError(
            f"this state_dict was written by a newer memopt-func (state_dict format {fmt}; this version reads "
            f"formats 0 to {FORMAT}): upgrade memopt-func to load it"
        )
    theirs = state_dict.get(KEY, {}).get("rule")
    if theirs is not None and theirs != rule_name:
        raise ValueError(
            f"this state_dict was saved by a {theirs} optimizer; it cannot be loaded into {optimizer_name} "
            f"(the two keep different state under the same names)"
        )


def upgrade_group(group: Mapping[str, Any], index: int, names: list[str], defaults: Mapping[str, Any], optimizer_name: str) -> dict[str, Any]:
    """A saved param group with the hyperparameters later formats added set to ``defaults``;
    ValueError naming what is missing when it lacks one that every format saved."""
    out = {**{n: defaults[n] for n in names if n in _OPTIONAL_GROUP_KEYS and n not in group}, **group}
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"param group {index} of this state_dict lacks {missing}: it is not a {optimizer_name} state_dict")
    return out


def upgrade_entry(entry: Mapping[str, Any], wanted: Mapping[str, Any], zeros) -> dict[str, Any]:
    """A saved per-parameter entry with the entries later formats added, started at zero
    (``zeros(template)`` makes one like ``wanted``'s tensor)."""
    out = dict(entry)
    for k in _ZERO_ENTRIES:
        if k in wanted and k not in out:
            out[k] = zeros(wanted[k])
    return out


__all__ = ["KEY", "FORMAT", "GROUP_KEYS_ADDED", "ENTRIES_ADDED", "header", "saved_format", "check_readable", "upgrade_group", "upgrade_entry"]
