"""Small helpers shared by the tests."""
import ast
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch.optim.optimizer import register_optimizer_step_pre_hook


def rel_err(ours, ref):
    """Largest absolute difference, relative to the reference's largest magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def perturb(model, seed=0):
    """Move every parameter off its default init (norms are 1/0 there) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = p.std() if p.numel() > 1 and p.std() > 0 else 1.0
        p.add_(0.2 * scale * torch.randn(p.shape, generator=g))
    return model



def ckpt_check(model, loss_fn, grad_fn):
    """Without and with `model.grad_ckpt`: loss_fn() (forward, counting the tensors it stores), backward,
    then grad_fn() gives the gradient. The two must agree, and checkpointing must store under half."""
    grads, saved = [], []
    for ckpt in (False, True):
        model.grad_ckpt, n = ckpt, [0]
        with torch.autograd.graph.saved_tensors_hooks(lambda z: n.__setitem__(0, n[0] + 1) or z, lambda z: z):
            loss = loss_fn()
        loss.backward()
        grads.append(grad_fn())
        saved.append(n[0])
    assert rel_err(grads[1], grads[0]) <= 1e-6
    assert saved[1] < saved[0] / 2  # checkpointing really dropped the stored activations


def repo_imports(name):
    """The repository's own modules that `name`.py imports: what must come along when it is copied elsewhere."""
    root = Path(__file__).parent.parent
    tree = ast.parse((root / f"{name}.py").read_text())
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    return {m.split(".")[0] for m in mods} & {p.stem for p in root.glob("*.py")}


def assert_same_grads(ours, ref, rtol=1e-5):
    """Equal gradients {name: tensor}: each to rtol of its own largest entry, or to 1e-7 of the largest of all
    (a tensor whose exact gradient is 0, as attention's key biases have, holds rounding noise only)."""
    assert ours.keys() == ref.keys() and ref
    scale = max(g.abs().max() for g in ref.values())
    bad = {k: f"{(ours[k] - ref[k]).abs().max():.2e} of {ref[k].abs().max():.2e}" for k in ref
           if (ours[k] - ref[k]).abs().max() > rtol * ref[k].abs().max() + 1e-7 * scale}
    assert not bad, bad


@contextmanager
def recording(folder):
    """While inside, train.py writes to folder/rank<r>.safetensors each micro-step's losses (`losses`, (n, 4):
    itc, is_, rsc, total) and the gradients of its first optimizer step (`grad.<name>`) as the optimizer gets
    them: summed over micro-steps, averaged over ranks, clipped, before any optimizer normalises them (under FSDP
    gathered whole: every rank gathers, each writes)."""
    import train  # the patched names: the UniDiff class train uses, and every optimizer's step
    from torch.distributed.tensor import DTensor
    from weights import save_safetensors
    real, rows, grads, model = train.UniDiff.losses, [], {}, []
    Path(folder).mkdir(parents=True, exist_ok=True)

    def losses(self, *a, **kw):
        out = real(self, *a, **kw)
        model[:] = [self]
        rows.append(torch.stack([out[k].detach().float() for k in ("itc", "is_", "rsc", "total")]))
        return out

    def before_step(opt, *_):
        if not model:  # an optimizer before the first training step (the tiny VAE's fit)
            return
        if not grads:  # the names now: inside a forward FSDP swaps the gathered weights in
            names = {p: n for n, p in model[0].named_parameters()}
            grads.update({f"grad.{names[p]}": p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
                          for g in opt.param_groups for p in g["params"] if p.grad is not None})
        rank = dist.get_rank() if dist.is_initialized() else 0
        save_safetensors({"losses": torch.stack(rows), **grads}, Path(folder) / f"rank{rank}.safetensors")

    train.UniDiff.losses = losses
    hook = register_optimizer_step_pre_hook(before_step)
    try:
        yield
    finally:
        train.UniDiff.losses = real
        hook.remove()


def ctrl_c_at(monkeypatch, train, step):
    """Ctrl-C to this process as train.py's step `step` begins (when it looks up that step's learning rate)."""
    real_lr = train.lr_factor
    def interrupt(s, *a):
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr(s, *a)
    monkeypatch.setattr(train, "lr_factor", interrupt)
    return real_lr
