"""Drop-in optimizers against the functional rules they wrap (bit for bit) and, in their
degenerate settings, against torch.optim (float64, relative error under 1e-12)."""

from __future__ import annotations

import pytest
import torch

from dropin_common import dropin, mlp, mse, rel_err, run_side_by_side

# name, kwargs: every drop-in, synced and per-tensor, with weight decay / amsgrad / momentum / ... switched on.
VARIANTS = [
    ("Adam_CM", dict(lr=1e-2, topC=3)),
    ("Adam_CM", dict(lr=1e-2, topC=3, synced=False, weight_decay=0.1)),
    ("Adam_CM", dict(lr=1e-2, topC=4, amsgrad=True, weight_decay=0.05, decay=0.9, kappa=0.5)),
    ("Adam_CM", dict(lr=1e-2, topC=2, synced=False, amsgrad=True, aggr="mean", critical_test=0.4, seed=3)),
    ("Adam_CM", dict(lr=1e-2, topC=3, buffer_dtype=torch.float32, aggr="buffer")),
    ("Adam_C", dict(lr=1e-2, topC=3)),
    ("Adam_C", dict(lr=1e-2, topC=3, synced=False, weight_decay=0.1, amsgrad=True)),
    ("Adam_C", dict(lr=1e-2, topC=5, aggr="mean", critical_test=0.5, decay=0.5)),
    ("Adam_C", dict(lr=1e-2, topC=3, synced=False, aggr="buffer", buffer_dtype=torch.float16, kappa=2.0)),
    ("RMSprop_C", dict(lr=1e-3, topC=3)),
    ("RMSprop_C", dict(lr=1e-3, topC=3, synced=False, momentum=0.5, centered=True, weight_decay=0.01)),
    ("RMSprop_C", dict(lr=1e-3, topC=4, aggr="sum", alpha=0.9, critical_test=0.3)),
    ("SGD_C", dict(lr=1e-2, topC=3)),
    ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD_C", dict(lr=1e-2, topC=3, synced=False, momentum=0.9, weight_decay=0.01, aggr="mean")),
    ("SGD_C", dict(lr=1e-2, topC=6, synced=False, critical_test=0.25, decay=1.0, buffer_dtype=torch.bfloat16)),
    ("AdEMAMix", dict(lr=1e-2)),
    ("AdEMAMix", dict(lr=1e-2, weight_decay=0.1, alpha=5.0)),
    ("AdEMAMix", dict(lr=1e-2, alpha_warmup=7, beta3_warmup=11)),
    ("AdEMAMix", dict(lr=1e-2, betas=(0.0, 0.999, 0.999), beta3_warmup=5)),
    ("AdEMAMix_C", dict(lr=1e-2, topC=3)),
    ("AdEMAMix_C", dict(lr=1e-2, topC=3, synced=False, weight_decay=0.1, alpha=5.0, aggr="mean")),
    ("AdEMAMix_C", dict(lr=1e-2, topC=4, alpha_warmup=7, beta3_warmup=11, critical_test=0.4, seed=3, decay=0.9,
                        maximize=True)),
    ("AdEMAMix_C", dict(lr=1e-2, topC=2, synced=False, betas=(0.0, 0.999, 0.999), aggr="buffer",
                        buffer_dtype=torch.float16, kappa=2.0, foreach=False)),
]


def _id(v):
    name, kw = v
    return name + "-" + ",".join(f"{k}={getattr(x, '__name__', x)}" for k, x in kw.items())


@pytest.mark.parametrize("variant", VARIANTS, ids=[_id(v) for v in VARIANTS])
def test_dropin_matches_functional_rule_bitwise_float64(variant):
    name, kwargs = variant
    run_side_by_side(name, kwargs, steps=30, dtype=torch.float64)


@pytest.mark.parametrize(
    "variant",
    [VARIANTS[1], VARIANTS[6], VARIANTS[10], VARIANTS[14], VARIANTS[18], VARIANTS[21]],
    ids=lambda v: _id(v),
)
def test_dropin_matches_functional_rule_bitwise_float32(variant):
    name, kwargs = variant
    run_side_by_side(name, kwargs, steps=30, dtype=torch.float32)


@pytest.mark.parametrize("synced", [True, False])
@pytest.mark.parametrize("name", ["Adam_CM", "Adam_C", "RMSprop_C", "SGD_C", "AdEMAMix", "AdEMAMix_C"])
def test_dropin_matches_functional_rule_with_missing_gradients(name, synced):
    """Parameters without .grad at some steps: the drop-in skips them exactly as the rule skips None leaves."""
    kwargs = dict(lr=1e-2) if name == "AdEMAMix" else dict(lr=1e-2, topC=3, synced=synced)
    if name == "SGD_C":
        kwargs["momentum"] = 0.9
    run_side_by_side(name, kwargs, steps=20, skip=lambda k, i: (k % 3 == 1 and i == 0) or (k % 4 == 2 and i == 3))


# ---- degenerate settings: the drop-in is its torch.optim base -------------------------------------------

DEGENERATE = [
    ("Adam_C", dict(lr=1e-2, kappa=0.0), torch.optim.Adam, dict(lr=1e-2)),
    ("Adam_C", dict(lr=1e-2, topC=0, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99)),
     torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, betas=(0.8, 0.99))),
    ("Adam_CM", dict(lr=1e-2, kappa=0.0, weight_decay=0.1), torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1)),
    ("Adam_CM", dict(lr=1e-2, topC=0, amsgrad=True, eps=1e-6),
     torch.optim.AdamW, dict(lr=1e-2, amsgrad=True, eps=1e-6, weight_decay=0.0)),
    ("RMSprop_C", dict(lr=1e-3, topC=0), torch.optim.RMSprop, dict(lr=1e-3)),
    ("RMSprop_C", dict(lr=1e-3, kappa=0.0, momentum=0.5, centered=True, weight_decay=0.01, alpha=0.9),
     torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5, centered=True, weight_decay=0.01, alpha=0.9)),
    ("SGD_C", dict(lr=1e-2, topC=0), torch.optim.SGD, dict(lr=1e-2)),
    ("SGD_C", dict(lr=1e-2, kappa=0.0, momentum=0.9, dampening=0.1, weight_decay=0.01),
     torch.optim.SGD, dict(lr=1e-2, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    ("SGD_C", dict(lr=1e-2, topC=0, momentum=0.5, weight_decay=0.1),
     torch.optim.SGD, dict(lr=1e-2, momentum=0.5, weight_decay=0.1)),
    ("AdEMAMix", dict(lr=1e-2, alpha=0.0), torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)),
    ("AdEMAMix", dict(lr=1e-2, alpha=0.0, betas=(0.8, 0.99, 0.999), weight_decay=0.1, eps=1e-6, beta3_warmup=5),
     torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-6)),
    ("AdEMAMix_C", dict(lr=1e-2, alpha=0.0, kappa=0.0),
     torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)),
    ("AdEMAMix_C", dict(lr=1e-2, alpha=0.0, topC=0, betas=(0.8, 0.99, 0.999), weight_decay=0.1, eps=1e-6),
     torch.optim.AdamW, dict(lr=1e-2, betas=(0.8, 0.99), weight_decay=0.1, eps=1e-6)),
]


@pytest.mark.parametrize("case", DEGENERATE, ids=[_id(c[:2]) + "-vs-" + c[2].__name__ for c in DEGENERATE])
def test_degenerate_dropin_equals_torch_optim(case):
    name, kwargs, torch_cls, torch_kwargs = case
    ours_model, ref_model = mlp(), mlp()
    ours = dropin(name)(ours_model.parameters(), **kwargs)
    ref = torch_cls(ref_model.parameters(), foreach=False, **torch_kwargs)
    start = [p.detach().clone() for p in ours_model.parameters()]
    for k in range(30):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            mse(model, k).backward()
            opt.step()
        for i, (a, b) in enumerate(zip(ours_model.parameters(), ref_model.parameters())):
            err = rel_err(a, b)
            assert err < 1e-12, f"step {k} param {i}: relative error {err:.3e} vs {torch_cls.__name__}"
    # the run moved the parameters (a no-op optimizer must not pass)
    assert any(not torch.equal(a, b) for a, b in zip(start, ours_model.parameters()))
    # no critical buffer is allocated in the degenerate setting
    for p in ours_model.parameters():
        assert not any(k.startswith("critical_") for k in ours.state[p]), sorted(ours.state[p])


def test_degenerate_sgd_c_differs_from_nondegenerate():
    """Sanity for the reduction tests: with a buffer, SGD_C does not equal SGD (so the check has teeth)."""
    a, b = mlp(), mlp()
    oa = dropin("SGD_C")(a.parameters(), lr=1e-2, topC=3)
    ob = torch.optim.SGD(b.parameters(), lr=1e-2)
    for k in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            mse(m, k).backward()
            o.step()
    assert max(rel_err(x, y) for x, y in zip(a.parameters(), b.parameters())) > 1e-6


@pytest.mark.parametrize(
    "variant",
    [
        ("Adam_CM", dict(lr=1e-2, topC=3)),
        ("Adam_C", dict(lr=1e-2, topC=3, buffer_dtype=torch.float32, synced=False)),
        ("RMSprop_C", dict(lr=1e-3, topC=3, momentum=0.5)),
        ("SGD_C", dict(lr=1e-2, topC=3, momentum=0.9, synced=False)),
        ("AdEMAMix", dict(lr=1e-2, beta3_warmup=6)),
        ("AdEMAMix_C", dict(lr=1e-2, topC=3, beta3_warmup=6, synced=False)),
    ],
    ids=lambda v: _id(v),
)
def test_dropin_matches_functional_rule_bitwise_bfloat16(variant):
    name, kwargs = variant
    run_side_by_side(name, kwargs, steps=10, dtype=torch.bfloat16)
