"""Which 8-bit code and block size to store each kind of optimizer state in (memopt_func.storage).

Trains an MLP of about 300k parameters (64-512-512-10, a random teacher's labels) with AdamW and
snapshots its first moment ``m`` and second moment ``v`` at several steps. For each power code
(power 1 is linear absmax) and block size it quantizes the snapshots to nearest and reports:

* ``m``: the relative L2 error of the dequantized first moment;
* ``v``: the relative L2 error of the Adam direction ``m / (sqrt(v) + eps)`` computed with the
  dequantized ``v`` (what the second moment is for); the code keeps a non-zero ``v`` off code 0
  (one that became zero would divide by eps instead of sqrt(v): a step up to 1e8 times too big),
  and the "unguarded" columns show the error and the share of zeroed ``v`` without that guard;
* bytes per element (one code byte plus the block's float32 absmax).

Run: ``python bench/int8_codes.py`` (about a minute on a laptop CPU).
"""

from __future__ import annotations

import torch
from torch import nn

from memopt_func import _codes as C
from memopt_func import storage as S


def snapshots(steps=(10, 100, 400), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 64, generator=gen)
    teacher = torch.randn(64, 10, generator=gen)
    y = (x @ teacher + 0.5 * torch.randn(4096, 10, generator=gen)).argmax(1)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for k in range(1, max(steps) + 1):
        i = torch.randint(0, 4096, (128,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i]), y[i]).backward()
        opt.step()
        if k in steps:
            for p in model.parameters():
                if p.numel() >= S.MIN_QUANTIZED:
                    st = opt.state[p]
                    out.append((k, st["exp_avg"].clone(), st["exp_avg_sq"].clone()))
    return out


def measure(snaps, kind, power, block, keep_nonzero=True):
    old = C.BLOCK[kind], C.POWER[kind]
    C.BLOCK[kind], C.POWER[kind] = block, power
    C._KEEP_NONZERO = keep_nonzero
    try:
        errs, zeroed, nonzero = [], 0, 0
        for _, m, v in snaps:
            if kind == "signed":
                d = S.dequantize(S.quantize(m, kind, None), kind, m.shape, torch.float32)
                errs.append(((d - m).norm() / m.norm()).item())
            else:
                d = S.dequantize(S.quantize(v, kind, None), kind, v.shape, torch.float32)
                want = m / (v.sqrt() + 1e-8)
                got = m / (d.sqrt() + 1e-8)
                errs.append(((got - want).norm() / want.norm()).item())
                zeroed += int(((d == 0) & (v != 0)).sum())
                nonzero += int((v != 0).sum())
        return max(errs), (zeroed / nonzero if nonzero else 0.0)
    finally:
        C.BLOCK[kind], C.POWER[kind] = old
        C._KEEP_NONZERO = True


def main():
    snaps = snapshots()
    print(f"{'kind':7} {'power':>5} {'block':>6} {'B/elem':>7} {'max rel err':>12} {'unguarded err':>14} {'v zeroed unguarded':>19}")
    for kind in ("signed", "square"):
        for power in (1.0, 2.0, 3.0, 4.0):
            for block in (64, 256, 2048):
                err, _ = measure(snaps, kind, power, block)
                raw, zeroed = measure(snaps, kind, power, block, keep_nonzero=False)
                print(f"{kind:7} {power:5.0f} {block:6d} {1 + 4 / block:7.3f} {err:12.4f} {raw:14.4f} {zeroed:19.2e}")


if __name__ == "__main__":
    main()
