"""Several processes under torchrun: DDP (each rank holds the whole model) or --fsdp (each rank holds a shard of every
trained weight, its gradient and AdamW's moments: PyTorch's FSDP2, `fully_shard`).

Under FSDP the weights are DTensors. A block gathers its own weights as it runs and frees them after; a checkpoint
is gathered whole onto rank 0's CPU and written in the same layouts as without FSDP, so --resume, sample.py,
eval.py, diffusers and ComfyUI read it unchanged."""
import os
from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel as DDP

import clip
import unet
from unidiff import UniDiff
from weights import load_strict

# The methods besides forward that run the model's weights: FSDP gathers the root's own weights around each.
FORWARD_METHODS = ("contrastive_cache", "generate", "image_embeddings", "text_embeddings")


class Dist(NamedTuple):
    """This process's place: the only one, or one rank of `world` (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    ddp: bool  # several processes (DDP, or FSDP when `fsdp`)
    rank: int
    world: int
    device: torch.device
    master: bool  # rank 0 writes the run folder
    cuda: bool  # the device is a GPU
    fsdp: bool = False  # the weights are sharded over the ranks

    def barrier(self):
        if self.ddp:
            dist.barrier()


def init_distributed(fsdp=False):
    """Several ranks when torchrun started several processes; the device: this rank's GPU, else the CPU."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rank = dist.get_rank() if ddp else 0
    return Dist(ddp, rank, dist.get_world_size() if ddp else 1, device, rank == 0, device.type == "cuda", fsdp and ddp)


def wrap(model, compile, every_loss_on, d):
    """What the steps call: the model compiled (each network in place, before DDP sees it), under DDP wrapped;
    under FSDP the model itself, sharded already (shard)."""
    if compile:
        model.compile()
    if not d.ddp or d.fsdp:
        return model
    # a λ of 0 leaves parts without gradient: DDP must then look for unused parameters
    return DDP(model, device_ids=[d.device.index] if d.cuda else None, broadcast_buffers=False,
               find_unused_parameters=not every_loss_on)


def no_sync(net, last):
    """DDP all-reduces at the last micro-step only. FSDP reduce-scatters at every one: the simplest correct choice,
    since skipping it would keep whole unsharded gradients on each rank until the last."""
    return net.no_sync() if isinstance(net, DDP) and not last else nullcontext()


def shard(model, d):
    """FSDP2 in place: each CLIP layer, UNet ResNet block and UNet transformer a unit, the rest of the trained
    networks the root's; the frozen VAE stays whole on every rank (it gets no gradient to shard)."""
    model.shapes = {n: p.shape for n, p in model.named_parameters()}  # the checkpoint's shapes (whole)
    for m in list(model.modules()):  # FSDP shards along the first dim: a 0-dim weight (the logit scale) gets one
        for name, p in list(m.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(m, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
    # bf16 weights in the blocks' compute, fp32 master weights and gradient reduction; CPU (gloo): fp32 throughout
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if d.cuda else MixedPrecisionPolicy()
    for m in model.modules():
        if isinstance(m, (clip.Block, unet.ResnetBlock, unet.Transformer)):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, ignored_params=set(model.vae.parameters()))  # the root: embeddings, projections, logit scale
    for name in FORWARD_METHODS:
        register_fsdp_forward_method(model, name)


def like(t, p):
    """A whole tensor `t` (the same on every rank) shaped, typed and placed as `p`: for a DTensor, this rank's shard,
    cut locally (each rank read the file or holds the copy: nothing to send)."""
    t = t.detach().to(p.device, p.dtype)
    t = t.reshape(p.shape) if t.ndim == 0 else t  # a 0-dim weight is (1,) under FSDP (shard)
    return distribute_tensor(t, p.device_mesh, p.placements, src_data_rank=None) if isinstance(p, DTensor) else t


def local(t):
    """This rank's part of `t`: its shard of a DTensor, else `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def all_finite(tensors, d):
    """Whether every tensor is finite, the same answer on every rank (under FSDP each checks its shards)."""
    ok = torch.stack([local(t).isfinite().all() for t in tensors]).all().int()
    if d.fsdp:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok)


def whole(model, named, tensors, shown, d):
    """A checkpoint's contents gathered whole onto rank 0's CPU, in the unsharded shapes -> (a plain UniDiff,
    its (name, parameter) for `named`, the optimizer's `tensors`, `shown`) on rank 0, Nones elsewhere. Every rank
    takes part in each gather, in the same order; the others drop what they gathered."""
    def full(name, t):
        t = t.full_tensor() if isinstance(t, DTensor) else t
        return t.detach().cpu().reshape(model.shapes.get(name, t.shape)) if d.master else None
    sd = {k: full(k, v) for k, v in model.state_dict().items()}
    tensors = {k: full(k.rsplit(".", 1)[0] if k.endswith((".exp_avg", ".exp_avg_sq")) else k, v)
               for k, v in tensors.items()}
    shown = [full(n, t) for (n, _), t in zip(named, shown)] if shown is not None else None
    if not d.master:
        return None, None, None, None
    sub = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    with torch.device("meta"):  # no time spent initialising weights that are overwritten
        u = unet.UNet(model.unet.cfg)
    plain = UniDiff(clip.CLIP.from_state_dict(sub("clip."), model.clip.cfg),
                    load_strict(u.to_empty(device="cpu"), sub("unet."), "the gathered UNet"), model.vae,
                    model.v_prediction)
    return plain, [(n, plain.get_parameter(n)) for n, _ in named], tensors, shown
