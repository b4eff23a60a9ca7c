"""Jobs the two distributed test workers run (tests/dist_pool.py): FSDP2 and DDP training of a
small MLP with unevenly sharded weights, compared with the same run in one process."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from memopt_func import compiled, optim, sharding

SIZES = (6, 7, 5, 3)  # Shard(0) over 2 ranks: 7 -> 4 + 3, 5 -> 3 + 2, 3 -> 2 + 1 rows
BATCH = 16


def mlp() -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).double()


def batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + k)
    return torch.randn(BATCH, SIZES[0], generator=gen, dtype=torch.float64), torch.randn(BATCH, SIZES[-1], generator=gen, dtype=torch.float64)


def scale(k: int) -> float:
    """A loss scale that rises and falls over decades, so full buffers both admit and refuse."""
    return 10.0 ** (2.0 * math.sin(0.9 * k))


def loss(model: nn.Module, k: int, rows: slice = slice(None)) -> torch.Tensor:
    x, y = batch(k)
    return ((model(x[rows]) - y[rows]) ** 2).mean() * scale(k)


def make_optimizer(params, name: str, hyper: dict, use_compiled: bool = False):
    module = compiled if use_compiled else optim
    return getattr(module, name)(params, **hyper)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if sharding.is_sharded(t) else t


def reference(name: str, hyper: dict, steps: int, start: int = 0, model=None, opt=None):
    model = model or mlp()
    opt = opt or make_optimizer(model.parameters(), name, hyper)
    for k in range(start, start + steps):
        opt.zero_grad()
        loss(model, k).backward()
        opt.step()
    return model, opt


def wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rank_rows() -> slice:
    per = BATCH // dist.get_world_size()
    r = dist.get_rank()
    return slice(r * per, (r + 1) * per)


def train(name: str, hyper: dict, mode: str, steps: int = 20, use_compiled: bool = False) -> dict[str, Any]:
    """Train distributed and in one process; the relative error, this rank's keys and stats,
    whether every state tensor is sharded like its parameter, and this rank's state bytes."""
    ref_model, ref_opt = reference(name, hyper, steps)
    model = wrap(mlp(), mode)
    opt = make_optimizer(model.parameters(), name, hyper, use_compiled)
    for k in range(steps):
        opt.zero_grad()
        loss(model, k, rank_rows()).backward()
        opt.step()
    err = 0.0
    for p, q in zip(model.parameters(), ref_model.parameters()):
        a, b = full(p.detach()), q.detach()
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item())
    keys, sharded_like, local_bytes, ref_bytes = [], True, 0, 0
    for p in model.parameters():
        for key, v in opt.state[p].items():
            if key.startswith("critical_") and key[9:] in ("keys", "count", "offers", "accepted", "nonfinite"):
                keys.append((key, v.tolist()))
                continue
            local_bytes += sharding.local(v).numel() * v.element_size()
            if sharding.is_sharded(p) and v.dim() >= p.dim() and v.dim() > 0:
                want = [type(pl)(pl.dim + v.dim() - p.dim()) if pl.is_shard() else pl for pl in p.placements]
                sharded_like &= sharding.is_sharded(v) and list(v.placements) == want
    for q in ref_model.parameters():
        for key, v in ref_opt.state[q].items():
            if not (key.startswith("critical_") and key[9:] in ("keys", "count", "offers", "accepted", "nonfinite")):
                ref_bytes += v.numel() * v.element_size()
    stats = opt.get_offline_stats() if hasattr(opt, "get_offline_stats") else {}
    ref_stats = ref_opt.get_offline_stats()
    return {
        "err": err, "keys": keys, "stats": {k: v for k, v in stats.items() if k != "groups"},
        "ref_stats": {k: v for k, v in ref_stats.items() if k != "groups"},
        "sharded_like": sharded_like, "local_bytes": local_bytes, "ref_bytes": ref_bytes,
    }


def _skewed_grads(k: int, params, shapes) -> list[torch.Tensor]:
    """Full gradients whose rows on rank 0 and rank 1 are scaled differently per layer and step."""
    from torch.distributed.tensor import Shard, distribute_tensor

    out = []
    for i, (p, shape) in enumerate(zip(params, shapes)):
        gen = torch.Generator().manual_seed(5000 + 31 * k + i)
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        half = math.ceil(shape[0] / 2)
        a = 10.0 ** (1.5 * math.sin(k + i))
        b = 10.0 ** (1.5 * math.cos(1.7 * k - i))
        g[:half] *= a
        g[half:] *= b
        out.append(g if p is None else distribute_tensor(g, p.device_mesh, [Shard(0)]))
    return out


def skew(name: str, wrong: str | None = None, steps: int = 25) -> dict[str, Any]:
    """Explicit gradients with a per-rank skew; ``wrong`` swaps in a wrong norm combination
    ("local": each rank's own shard norm; "sum_of_shard_norms": sum over ranks of shard norms)."""
    hyper = dict(lr=1e-2, topC=3, decay=0.97)
    kept = sharding.NormReducer.full_norms
    if wrong is not None:
        def combine(self, local_norms):
            if wrong == "local":
                return local_norms
            out = local_norms.clone()
            dist.all_reduce(out)
            return out

        sharding.NormReducer.full_norms = combine
    try:  # the pool's workers run later jobs too: the wrong combination must not outlive this one
        ref = mlp()
        model = wrap(mlp(), "fsdp")
        shapes = [q.shape for q in ref.parameters()]
        ref_opt = make_optimizer(ref.parameters(), name, hyper)
        opt = make_optimizer(model.parameters(), name, hyper)
        params = list(model.parameters())
        for k in range(steps):
            for q, g in zip(ref.parameters(), _skewed_grads(k, [None] * len(shapes), shapes)):
                q.grad = g
            for p, g in zip(params, _skewed_grads(k, params, shapes)):
                p.grad = g
            ref_opt.step()
            opt.step()
    finally:
        sharding.NormReducer.full_norms = kept
    err = max(((full(p.detach()) - q.detach()).abs().max() / q.detach().abs().max()).item() for p, q in zip(params, ref.parameters()))
    keys = opt.state[params[0]]["critical_keys"].tolist()
    ref_stats = ref_opt.get_offline_stats()
    return {"err": err, "keys": keys, "accepted": ref_stats["accepted"], "offers": ref_stats["offers"]}


def dcp_resume(name: str, path: str, steps: int = 6) -> dict[str, Any]:
    """Train, save with torch.distributed.checkpoint, train on; then load into a fresh model and
    optimizer and train the same steps: the two continuations must agree bitwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    hyper = dict(lr=1e-2, topC=3, decay=0.97) if name != "AdEMAMix" else dict(lr=1e-2)
    model = wrap(mlp(), "fsdp")
    opt = make_optimizer(model.parameters(), name, hyper)
    for k in range(steps):
        opt.zero_grad()
        loss(model, k, rank_rows()).backward()
        opt.step()
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
    for k in range(steps, 2 * steps):
        opt.zero_grad()
        loss(model, k, rank_rows()).backward()
        opt.step()
    first = [full(p.detach()).clone() for p in model.parameters()]

    model2 = wrap(mlp(), "fsdp")
    opt2 = make_optimizer(model2.parameters(), name, hyper)
    msd2, osd2 = get_state_dict(model2, opt2)
    state = {"model": msd2, "optim": osd2}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for k in range(steps, 2 * steps):
        opt2.zero_grad()
        loss(model2, k, rank_rows()).backward()
        opt2.step()
    second = [full(p.detach()) for p in model2.parameters()]
    return {"bitwise": all(torch.equal(a, b) for a, b in zip(first, second)), "final": [t.tolist() for t in first]}


def load_and_train(name: str, path: str, steps: int = 6) -> list:
    """Load a checkpoint (saved by any number of processes) into an FSDP2 model and optimizer and
    train steps ``steps .. 2*steps - 1``; the final full parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    hyper = dict(lr=1e-2, topC=3, decay=0.97) if name != "AdEMAMix" else dict(lr=1e-2)
    model = wrap(mlp(), "fsdp")
    opt = make_optimizer(model.parameters(), name, hyper)
    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for k in range(steps, 2 * steps):
        opt.zero_grad()
        loss(model, k, rank_rows()).backward()
        opt.step()
    return [full(p.detach()).tolist() for p in model.parameters()]


def single_process(name: str, path: str, save: bool, steps: int = 6) -> list:
    """In this process alone (no process group): train steps 0..steps-1 and save, or load the
    checkpoint and train steps ``steps .. 2*steps - 1``; the final parameters."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    hyper = dict(lr=1e-2, topC=3, decay=0.97) if name != "AdEMAMix" else dict(lr=1e-2)
    model = mlp()
    opt = make_optimizer(model.parameters(), name, hyper)
    if save:
        reference(name, hyper, steps, model=model, opt=opt)
        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path, no_dist=True)
        reference(name, hyper, steps, start=steps, model=model, opt=opt)
    else:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path, no_dist=True)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        reference(name, hyper, steps, start=steps, model=model, opt=opt)
    return [p.detach().tolist() for p in model.parameters()]


def compiled_on_fsdp() -> str:
    model = wrap(mlp(), "fsdp")
    try:
        compiled.Adam_CM(model.parameters(), lr=1e-2)
    except NotImplementedError as e:
        return str(e)
    return "accepted"


def replicated(name: str, steps: int = 12) -> dict[str, Any]:
    """Parameters as DTensors replicated on every rank (``Replicate()``), stepped with the same full
    gradients as one process: their local tensors are whole, so no collective may touch their
    norms. The largest relative difference of the parameters and of the keys from the one-process run."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    hyper = dict(lr=1e-2, topC=3, decay=0.97)
    ref = [p.detach().clone() for p in mlp().parameters()]
    ref = [nn.Parameter(p) for p in ref]
    params = [nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Replicate()])) for p in ref]
    ref_opt, opt = make_optimizer(ref, name, hyper), make_optimizer(params, name, hyper)
    shapes = [p.shape for p in ref]
    for k in range(steps):
        for q, p, g in zip(ref, params, _skewed_grads(k, [None] * len(shapes), shapes)):
            q.grad, p.grad = g, distribute_tensor(g, mesh, [Replicate()])
        ref_opt.step()
        opt.step()
    err = max(((full(p.detach()) - q.detach()).abs().max() / q.detach().abs().max()).item() for p, q in zip(params, ref))
    keys, ref_keys = opt.state[params[0]]["critical_keys"], ref_opt.state[ref[0]]["critical_keys"]
    keys_err = ((full(keys) - ref_keys).abs().max() / ref_keys.abs().max()).item()
    return {"err": err, "keys_err": keys_err, "keys": full(keys).tolist()}
