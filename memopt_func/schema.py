"""What each field of a rule's state is, declared once next to the state type.

Every state type (``AdamState``, ``CriticalBufferState``, ...) is a NamedTuple decorated with
``declare``, which gives each of its fields a role:

- ``STEP``: the ``[N]`` float64 step counters, one per leaf;
- ``MOMENT``: one tensor per leaf of the parameter's shape, stored as ``state_dtype`` says, with
  its 8-bit code's kind (``signed``, or ``square`` for a value never negative);
- ``SLOTS``: a critical buffer's slots, one ``[C, *p.shape]`` tensor per leaf, stored as
  ``buffer_dtype`` says;
- ``SLOT_SUM``: the sum of the filled slots per leaf, kept at least at compute precision;
- ``ROWS``: one row per admission decision (``[R, ...]``; R is 1 for a synced group, else the
  number of leaves): priorities and counters;
- ``NESTED``: another declared state (or None), whose state_dict keys take a prefix;
- ``LEAF``: any other per-leaf tuple, stored as computed; ``VECTOR``: any other tensor with one
  row per leaf.

Storage, the tree plumbing, the steppers and the drop-ins read these roles; none tests a field's
name. Each stored field's random stream id (SPEC.md, "Random streams") is a constant in
``STREAM_ID``; ``declare`` refuses a moment or slot field without one.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

STEP = "step"
"""Role: the ``[N]`` float64 step counters, one per leaf."""
MOMENT = "moment"
"""Role: one tensor per leaf of the parameter's shape, stored as ``state_dtype`` says."""
SLOTS = "slots"
"""Role: a critical buffer's ``[C, *p.shape]`` slots per leaf, stored as ``buffer_dtype`` says."""
SLOT_SUM = "slot_sum"
"""Role: the sum of a critical buffer's filled slots per leaf."""
ROWS = "rows"
"""Role: one row per admission decision (``[R, ...]``, R = 1 for a synced group)."""
NESTED = "nested"
"""Role: another declared state (or None)."""
LEAF = "leaf"
"""Role: any other per-leaf tuple, one tensor per leaf, stored as the step computes it."""
VECTOR = "vector"
"""Role: any other tensor with one row per leaf (``[N, ...]``)."""
ROLES = (STEP, MOMENT, SLOTS, SLOT_SUM, ROWS, NESTED, LEAF, VECTOR)
"""Every role."""

STREAM_ID = {
    "exp_avg": 0,
    "exp_avg_slow": 1,
    "momentum_buffer": 2,
    "grad_avg": 3,
    "exp_avg_sq": 4,
    "max_exp_avg_sq": 5,
    "square_avg": 6,
    "buf": 7,
    "params": 8,
}
"""Each stored field's random stream id: a constant written here, never a position in a list, so
that a new field moves no existing stream and a resume across versions draws the same bits.
Below 64 (``storage`` packs it beside the tensor's position); a new field takes the next unused
number, and a retired one's number is never reused."""

MOMENTS: dict[str, str] = {}
"""Every declared moment field's 8-bit code kind, by name (filled by ``declare``)."""


class Field(NamedTuple):
    """One field's declaration: its role, a moment's code kind, a nested state's key prefix."""

    role: str
    kind: str | None = None
    prefix: str = ""


def step() -> Field:
    """A field declaration: the per-leaf step counters."""
    return Field(STEP)


def moment(kind: str) -> Field:
    """A field declaration: a per-leaf moment that ``state_dtype`` stores; ``kind``: ``signed`` or ``square`` (never negative)."""
    if kind not in ("signed", "square"):
        raise ValueError(f"invalid moment kind: {kind!r} (signed or square)")
    return Field(MOMENT, kind)


def slots() -> Field:
    """A field declaration: a critical buffer's per-leaf ``[C, *p.shape]`` slots, which ``buffer_dtype`` stores."""
    return Field(SLOTS, "signed")


def slot_sum() -> Field:
    """A field declaration: the per-leaf sum of a critical buffer's filled slots."""
    return Field(SLOT_SUM)


def rows() -> Field:
    """A field declaration: one row per admission decision (priorities, counters)."""
    return Field(ROWS)


def leaf() -> Field:
    """A field declaration: any other per-leaf tuple, stored as computed."""
    return Field(LEAF)


def vector() -> Field:
    """A field declaration: any other tensor with one row per leaf."""
    return Field(VECTOR)


def nested(prefix: str = "") -> Field:
    """A field declaration: another declared state (or None); its state_dict keys take ``prefix``."""
    return Field(NESTED, prefix=prefix)


def declare(**fields: Field):
    """Class decorator: the roles of a state type's fields (every field, and no other)."""

    def apply(cls: type) -> type:
        names = getattr(cls, "_fields", None)
        if names is None:
            raise TypeError(f"declare takes a NamedTuple state type, got {cls.__name__}")
        if set(names) != set(fields):
            raise TypeError(
                f"{cls.__name__}: declared {sorted(fields)} but its fields are {sorted(names)}; declare each field once"
            )
        for name, f in fields.items():
            if not isinstance(f, Field) or f.role not in ROLES:
                raise TypeError(f"{cls.__name__}.{name}: {f!r} is not a schema field")
            if f.role in (MOMENT, SLOTS) and name not in STREAM_ID:
                raise TypeError(
                    f"{cls.__name__}.{name} is stored ({f.role}) but has no random stream id: add it to "
                    "schema.STREAM_ID with the next unused number"
                )
            if f.role == MOMENT:
                if MOMENTS.setdefault(name, f.kind) != f.kind:
                    raise TypeError(f"{cls.__name__}.{name}: declared {f.kind}, elsewhere {MOMENTS[name]}")
        cls.SCHEMA = {name: fields[name] for name in names}
        return cls

    return apply


_ROW_NAMES = ("keys", "count", "offers", "accepted", "nonfinite")
_INFERRED: dict[type, dict[str, Field]] = {}


def of(state: Any) -> dict[str, Field]:
    """The roles of a state's fields, by field name: declared, or for a NamedTuple state whose
    type is not declared (a rule written before ``declare`` existed), read off its field names
    as this package read them before, with a ``DeprecationWarning`` once per type."""
    schema = getattr(state, "SCHEMA", None)
    if isinstance(schema, dict):
        return schema
    if not hasattr(state, "_fields") or isinstance(state, type):
        raise TypeError(f"{getattr(state, '__name__', type(state).__name__)} is not a declared state type (schema.declare)")
    cls = type(state)
    if cls not in _INFERRED:
        _INFERRED[cls] = {name: _inferred(name, getattr(state, name)) for name in state._fields}
        import warnings

        warnings.warn(
            f"{cls.__name__} is not a declared state type; its fields' roles are read off their names "
            f"({', '.join(f'{n}: {f.role}' for n, f in _INFERRED[cls].items())}). Declare them with "
            "memopt_func.schema.declare; undeclared state types will be refused in a later version",
            DeprecationWarning,
            stacklevel=2,
        )
    return _INFERRED[cls]


def _inferred(name: str, value: Any) -> Field:
    if value is None or hasattr(value, "_fields"):
        return nested("" if name == "base" else f"{name}_")
    if name == "step":
        return step()
    if name in MOMENTS:
        return moment(MOMENTS[name])
    if name == "buf":
        return slots()
    if name == "buf_sum":
        return slot_sum()
    if name in _ROW_NAMES:
        return rows()
    return leaf() if isinstance(value, tuple) else vector()


def declared(value: Any) -> bool:
    """Whether value is a state (or state type) of a declared type."""
    return isinstance(getattr(value, "SCHEMA", None), dict)


def is_state(value: Any) -> bool:
    """Whether value is a rule state: a NamedTuple of a declared type, or one whose roles ``of``
    reads off its field names."""
    return hasattr(value, "_fields") and not isinstance(value, type)


def entries(state: Any, prefix: str = "") -> Iterator[tuple[str, str, Field, Any]]:
    """(state_dict key, field name, field, value) for every field holding tensors, nested states
    walked (their fields' keys take the nested declaration's prefix after the enclosing one)."""
    for name, f in of(state).items():
        value = getattr(state, name)
        if f.role == NESTED:
            if value is not None:
                yield from entries(value, prefix + f.prefix)
        elif value is not None:
            yield prefix + name, name, f, value


def keys(state: Any, role: str) -> list[str]:
    """The state_dict keys of a state's fields of one role (nested states included)."""
    return [key for key, _, f, _ in entries(state) if f.role == role]


__all__ = [
    "STEP", "MOMENT", "SLOTS", "SLOT_SUM", "ROWS", "NESTED", "ROLES", "STREAM_ID", "MOMENTS",
    "LEAF", "VECTOR", "Field", "step", "moment", "slots", "slot_sum", "rows", "nested", "leaf", "vector", "declare", "of",
    "declared", "is_state", "entries", "keys",
]
