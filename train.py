"""Fine-tune CLIP and Stable Diffusion together with ITC + IS + RSC: the plain PyTorch loop.

    python train.py --data demo                    # the shipped tiny model, fine-tuned on a synthetic domain
    python train.py --data fashion_woman           # SD 1.5 + CLIP ViT-L/14 (weights fetched once)
    torchrun --nproc_per_node=8 train.py --data fashion_woman   # DDP: the same run, 8 GPUs
    torchrun --nproc_per_node=8 train.py --data fashion_woman --fsdp   # sharded (parallel.py): 1/8 of the state each
    python train.py --resume runs/fashion_woman    # continue exactly where it stopped

Settings: config.py; options, signals, resume: docs/training.md. `--batch-size` is the global batch of a step,
split over the DDP ranks and `--grad-accum` micro-steps; the data order and each micro-step's randomness follow
from (seed, step, micro-step), so one GPU and eight give the same run and resuming at step N continues it exactly."""
import hashlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from clip import Tokenizer
from config import parse_args
from data import DataError, open_dataset, parse_res
from download import pretrained
from eval import SAMPLE, embed, generate, retrieval
from latent_cache import cached_training_set
from losses import l2_sp_
from lora import add_lora
from parallel import all_finite, init_distributed, like, no_sync, shard, whole, wrap
from runs import (RunError, StopSignal, Terminated, autocast, check_size, checkpoints, close_log, fmt_time,
                  ignore_signals, latest_checkpoint, load_checkpoint, load_lora, load_start, log_line, log_validation,
                  open_log, optimizer_tensors, read_state, save_checkpoint, save_start, say, swap_in, terminated,
                  to_uint8)
from unidiff import UniDiff
from vae import fit_vae
from weights import WeightsError

LOG_EVERY = 10  # steps between progress lines (and the loss's NaN check: reading the losses is a host sync)
# Non-finite gradients in a row that stop the run: one odd batch is skipped and forgotten, but ten in a row
# mean every batch now diverges (learning rate too high): skipping only burns time.
MAX_SKIPS = 10


def main(argv=None):
    cfg, term = None, signal.signal(signal.SIGTERM, terminated)  # until StopSignal: SIGTERM unwinds as Ctrl-C does
    try:
        cfg = parse_args(argv)
        return train(cfg)
    except (DataError, WeightsError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # in setup, or a second Ctrl-C in the loop: what is left to resume, not a traceback
        last = checkpoints(cfg.out) if cfg else []
        say(f"{'SIGTERM' if isinstance(e, Terminated) else 'SIGINT'}: stopped; "
            + (f"the last checkpoint is {last[-1]}: continue with --resume {cfg.out}" if last else
               "no checkpoint was saved: nothing to resume"))
        return 143 if isinstance(e, Terminated) else 130
    finally:
        close_log()
        signal.signal(signal.SIGTERM, term)
        if dist.is_initialized():
            dist.destroy_process_group()


def train(cfg):
    d = init_distributed(cfg.fsdp)
    run = Path(cfg.out)
    micro = micro_batch(cfg.batch_size, cfg.grad_accum, d.world)
    parts = trained_parts(cfg.train)
    train_set, test_set, ood_set = open_data(cfg.data, cfg.res, cfg.train_size, cfg.eval_every, cfg.ood_data, d)
    ckpt = resume_from(cfg.resume, run, cfg.tensorboard)
    model = start_model(cfg, ckpt, run, train_set, d)
    parts = present(model, parts)
    add_adapters(model, parts, cfg.lora, cfg.lora_alpha, cfg.seed, ckpt, cfg.lora_targets)
    prepare_model(model, parts, cfg.lora, cfg.grad_ckpt, d)
    opt, named = make_optimizer(model, cfg.lr_unet, cfg.lr_clip)
    params = [p for _, p in named]
    anchor, start_params = frozen_start(cfg, named, run, d)  # θ₀
    ema = [p.detach().float().clone() for p in params] if cfg.ema else None  # resuming: the checkpoint's EMA,
    step = load_checkpoint(ckpt, model, named, opt) if ckpt is not None else 0  # then its trained weights
    seen = read_state(ckpt)["samples_seen"] if ckpt is not None else 0  # the data position: --batch-size may change
    say(f"model: {cfg.model}, training {', '.join(parts)} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters); "
        f"global batch {cfg.batch_size} = {d.world} rank(s) × {cfg.grad_accum} micro-step(s) × {micro}; {cfg.res} px; "
        f"{'bf16 autocast on ' + torch.cuda.get_device_name(d.device) if d.cuda else 'fp32 on CPU'}")
    if cfg.cache_latents:  # after prepare_model: the encoding runs on the device
        train_set = cached_training_set(model, train_set, cfg.data, cfg.res, run, micro, d, say,
                                        loader_workers(cfg.workers, d))
    net = wrap(model, cfg.compile, cfg.lambda_itc and cfg.lambda_is and cfg.lambda_rsc, d)
    batches = iter(make_loader(train_set, micro, seen, cfg.seed, cfg.workers, d))
    losses_kw = dict(cfg.losses_kw(), anchor=anchor)
    shown = lambda: wise_ft(params, start_params, cfg.wise_ft) if cfg.wise_ft < 1 else ema  # saved and validated

    with StopSignal(d.ddp, say) as stop:
        first = last = None  # the validations' retrieval, for the summary line
        if step == 0 and cfg.eval_every:
            first = validate(model, params, shown(), test_set, ood_set, step, run, cfg.res, d)
        progress = Progress(d.device, cfg.steps, cfg.batch_size)
        while step < cfg.steps:
            factor = lr_factor(step, cfg.warmup, cfg.steps)
            gens = [torch.Generator().manual_seed(step_seed(cfg.seed, step, a)) for a in range(cfg.grad_accum)]
            losses = forward_backward(net, model, batches, gens, losses_kw, d)
            skipped = optimizer_step(opt, params, ema, step, cfg.max_grad_norm, cfg.ema, start_params, cfg.l2sp, factor)
            step, seen = step + 1, seen + cfg.batch_size
            if progress.add(losses, skipped) >= MAX_SKIPS:  # the skipped steps left the weights as they were
                save(model, named, opt, shown(), step, seen, run, cfg, d)
                raise skipped_out(step, run)
            stopping = stop.agreed()
            at_eval = bool(cfg.eval_every) and (step % cfg.eval_every == 0 or step == cfg.steps)
            at_save = step == cfg.steps or bool(cfg.save_every) and step % cfg.save_every == 0
            if step % LOG_EVERY and not (at_eval or at_save or stopping):
                continue
            say(progress.sync(step, factor, run, d))  # raises if the loss went bad
            if stopping:
                save(model, named, opt, shown(), step, seen, run, cfg, d)
                say(f"stopped at step {step}: continue with  {resume_command(d)} --resume {run}")
                return 128 + stopping  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
            if at_eval:
                last = validate(model, params, shown(), test_set, ood_set, step, run, cfg.res, d)
            if at_save:
                save(model, named, opt, shown(), step, seen, run, cfg, d)
            progress.t_line = time.time()  # validating and saving are not training time
    say(summary(step, run, first, last))
    return 0


def summary(step, run, first, last):
    """The last lines: the run's files, and (validated at its start and end) test R@1 in its domain and out of it."""
    samples = f", samples in {run / 'samples'}/" if (run / "samples").is_dir() else ""  # none without validation
    line = f"done: {step} steps; checkpoints in {run}/{samples}"
    r1 = lambda split: [(r[split]["i2t_r1"] + r[split]["t2i_r1"]) / 2 for r in (first, last)]
    if first and last:
        a, b = r1("test")
        line += f"\nsummary: test R@1 (mean of I→T and T→I) in domain {a:.1f} % → {b:.1f} % ({b - a:+.1f} points)"
        if "out of domain test" in first:
            a, b = r1("out of domain test")
            line += f"; out of domain {a:.1f} % → {b:.1f} %: {100 * b / max(a, 1e-9):.0f} % kept"
    return line


def resume_command(d):
    """How to launch this run again: python, or torchrun with this node's number of ranks."""
    ranks = os.environ.get("LOCAL_WORLD_SIZE", d.world)
    return f"torchrun --nproc_per_node={ranks} train.py{' --fsdp' * d.fsdp}" if d.ddp else "python train.py"


# ------------------------------------------------------------------------------ setup

def micro_batch(batch_size, grad_accum, world):
    """The samples of one rank's micro-step: --batch-size is split over the ranks and the --grad-accum micro-steps."""
    micro, rem = divmod(batch_size, world * grad_accum)
    if rem or micro < 1:
        raise RunError(f"--batch-size {batch_size} must be a positive multiple of ranks × --grad-accum "
                       f"= {world} × {grad_accum}")
    return micro


def trained_parts(train):
    """--train as a list, checked before anything is loaded."""
    parts = train.split(",")
    if set(parts) - {"unet", "text", "vision"}:
        raise RunError(f"--train {train!r}: choose from unet, text, vision (comma-separated)")
    return parts


def open_data(data, res, train_size, eval_every, ood_data, d):
    """The train, test and --ood-data test splits (None without validation); what each drops or converts, said."""
    sets = {"train": open_dataset(data, "train", res)}
    if train_size:
        sets["train"].keep_first(train_size)
    if eval_every:  # only validation reads the test rows
        sets["test"] = open_dataset(data, "test", res)
        if ood_data:
            sets["out of domain test"] = open_dataset(ood_data, "test", res)
    if d.master:  # counted, never silent; a line two splits share is said once
        said = {}
        for split, ds in sets.items():
            said.update({line: split for line in ds.report(Tokenizer().lengths) if line not in said})
        for line, split in said.items():
            say(f"data ({split}): {line}")
    return sets["train"], sets.get("test"), sets.get("out of domain test")


def resume_from(resume, run, tensorboard):
    """The checkpoint --resume continues (None: a new run), once sure the run folder holds nothing after it; the
    run's logs trimmed to it and opened."""
    ckpt = latest_checkpoint(resume) if resume else None
    if ckpt is None and any(run.glob("step_*")):
        raise RunError(f"{run} already holds checkpoints: continue it with --resume {run}, or pick another --out")
    if ckpt is not None and ckpt.name != checkpoints(run)[-1].name:
        raise RunError(f"{run} holds checkpoints after {ckpt.name} (the latest is {checkpoints(run)[-1].name}): "
                       f"continuing from {ckpt.name} would mix two runs there; move the later ones out first")
    open_log(run, read_state(ckpt)["step"] if ckpt is not None else -1, tensorboard)  # no step twice, none from before
    return ckpt


def start_model(cfg, ckpt, run, train_set, d):
    """The checkpoint's model, or a new run's start, recorded with the settings in run.json."""
    if ckpt is not None:
        say(f"resuming from {ckpt}")
        model = UniDiff.from_pretrained(ckpt)
    else:
        model, start = build_model(cfg.model, cfg.weights, cfg.seed, cfg.res, cfg.vae_steps, train_set, d)
    check_size(model, *parse_res(cfg.res))
    if model.clip.vision_model is None and (cfg.lambda_itc or cfg.lambda_rsc):
        raise RunError("ITC and RSC need a CLIP with a vision tower; this model has a text encoder only")
    if model.clip.vision_model is None and cfg.cache_latents:
        raise RunError("--cache-latents stores CLIP's view of each image, and this model has no vision tower: "
                       "train without --cache-latents")
    if ckpt is None and d.master:
        save_start(run, model, start, cfg)
    return model


def present(model, parts):
    """The `parts` the model has: an SD single file has no vision tower, so --train's vision is left out, said."""
    if model.clip.vision_model is not None or "vision" not in parts:
        return parts
    if parts == ["vision"]:
        raise RunError("--train vision: this model has no vision tower (a text encoder only): nothing would train")
    say("this model has no vision tower (a text encoder only): --train's vision is left out")
    return [p for p in parts if p != "vision"]


def build_model(name, weights, seed, res, vae_steps, train_set, d):
    """(model, where it came from): tiny from `weights` or random (its VAE fitted first), or SD 1.5 + CLIP-L."""
    if weights and checkpoints(weights):  # a run folder of ours: its newest checkpoint (a diffusers pipeline folder)
        weights = checkpoints(weights)[-1]
    if name == "tiny" and weights:
        return UniDiff.from_pretrained(weights), {"model": "tiny", "weights": str(weights), "init": "init"}
    if name == "tiny":
        # v-prediction: a UNet trained for minutes predicts ε poorly at high noise, and x̂0 = (z_t − √(1-ᾱ) ε̂) / √ᾱ
        # multiplies that error by up to 15 (t = 999); sampling starts there. v keeps x̂0's error bounded.
        model = UniDiff.tiny(seed=seed, v_prediction=True)
        check_size(model, *parse_res(res))  # before fitting its VAE at that size
        fit_vae(model.vae, train_set, vae_steps, seed, say)
        return model, {"model": "tiny", "seed": seed, "init": "init"}
    if d.master:
        pretrained(weights)  # one rank downloads; the others wait, then read
    d.barrier()
    sd, clip = pretrained(weights)
    return UniDiff.from_pretrained(sd, clip=clip), dict(model="sd15", sd=str(sd.resolve()), clip=str(clip.resolve()))


def frozen_start(cfg, named, run, d):
    """The run's start, read back from run.json -> (its CLIP, frozen, for anchored RSC; θ₀ of each `named` weight
    for L2-SP and WiSE-FT, placed as that weight is: under FSDP a shard). Nothing else of the start stays."""
    anchored, theta0 = cfg.lambda_rsc and cfg.rsc_form == "anchored", cfg.l2sp or cfg.wise_ft < 1
    if not (anchored or theta0):
        return None, None
    d.barrier()  # a new run's record is rank 0's to write (start_model)
    start = load_start(run)[0]
    anchor = start.clip.to(d.device).requires_grad_(False).eval() if anchored else None
    return anchor, [like(start.get_parameter(n), p) for n, p in named] if theta0 else None


def wise_ft(params, start_params, alpha):
    """WiSE-FT (Wortsman et al. 2022): the start's and the trained weights interpolated, (1 − α) θ₀ + α θ."""
    return [torch.lerp(p0.float(), p.detach().float(), alpha) for p0, p in zip(start_params, params)]


def add_adapters(model, parts, rank, alpha, seed, ckpt, targets):
    """--lora `rank`: seeded adapters on the `parts` (lora.py); resuming, the base weights and adapters of its files."""
    if not rank:
        return
    model.lora = add_lora(model, parts, rank, alpha, torch.Generator().manual_seed(seed), targets)
    if ckpt is not None:
        was = read_state(ckpt)["args"]
        if (was.get("lora"), was.get("lora_alpha")) != (rank, alpha):
            how = f"with --lora {was['lora']} --lora-alpha {was['lora_alpha']:g}" if was.get("lora") else "without --lora"
            raise RunError(f"{ckpt} was trained {how}: resume it without giving --lora or --lora-alpha again")
        load_lora(ckpt, model.lora)
    say(f"LoRA: rank {rank}, alpha {alpha:g}, on {len(model.lora)} layers ({targets}) of "
        f"{', '.join(parts)}: {sum(p.numel() for p in model.lora.parameters()):,} numbers train instead of their "
        f"{sum(a.target[0].weight.numel() for a in model.lora.values()):,}; the base weights are frozen")


def prepare_model(model, parts, lora, grad_ckpt, d):
    """On the device, the `parts` trainable (with `lora`: their adapters alone), the rest frozen; under FSDP sharded."""
    # FSDP moves each unit to the device as it cuts it, so no rank holds the whole model there; it leaves the VAE
    (model.vae if d.fsdp else model).to(d.device)
    if d.cuda:  # convolutions run fastest on NHWC tensors
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    model.unet.grad_ckpt = model.clip.grad_ckpt = model.vae.grad_ckpt = bool(grad_ckpt)
    model.requires_grad_(False)
    if lora:
        model.lora.requires_grad_(True)
        return
    # the logit scale trains with either tower; an SD single file's text encoder has no projection and no scale
    towers = {"unet": [model.unet], "text": [model.clip.text_model, model.clip.text_projection, model.clip.logit_scale],
              "vision": [model.clip.vision_model, model.clip.visual_projection, model.clip.logit_scale]}
    for part in parts:
        for m in towers[part]:
            if m is not None:
                m.requires_grad_(True)
    if d.fsdp:  # before the optimizer: it holds the shards
        shard(model, d)


def make_optimizer(model, lr_unet, lr_clip):
    """AdamW (per-part learning rates, no weight decay on 1-d tensors) and its parameters as (name, parameter)."""
    groups = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            part = "unet" if n.startswith(("unet.", "lora.lora_unet_")) else "clip"
            groups.setdefault((part, p.ndim >= 2), []).append((n, p))
    lrs = {"unet": lr_unet, "clip": lr_clip}
    opt = torch.optim.AdamW([{"params": [p for _, p in g], "base_lr": lrs[part], "lr": lrs[part],
                              "weight_decay": 1e-2 if decay else 0.0} for (part, decay), g in groups.items()],
                            betas=(0.9, 0.999), eps=1e-8, fused=True)  # fused: can skip a step on device (found_inf)
    return opt, [np_ for g in groups.values() for np_ in g]  # in group order: the optimizer numbers them so


def loader_workers(workers, d):
    return workers if workers is not None else (4 if d.cuda else 0)


def make_loader(train_set, micro, start, seed, workers, d):
    """This rank's micro-batches from data position `start` (samples seen) on."""
    workers = loader_workers(workers, d)
    return DataLoader(train_set, batch_sampler=Batches(len(train_set), micro, d.world, d.rank, seed, start),
                      num_workers=workers, pin_memory=d.cuda, persistent_workers=workers > 0,
                      worker_init_fn=ignore_signals)


# ------------------------------------------------------------------------------ data order

class Batches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches, from position `start` of an endless stream of seeded per-epoch
    permutations: global micro-batch k is positions [k·world·b, (k+1)·world·b), rank r's the r-th slice of it."""

    def __init__(self, n, micro, world, rank, seed, start):
        self.n, self.micro, self.world, self.rank, self.seed, self.start = n, micro, world, rank, seed, start

    def __iter__(self):
        pos, perm, epoch = self.start + self.rank * self.micro, None, -1
        while True:
            idx = []
            while len(idx) < self.micro:
                if pos // self.n != epoch:
                    epoch = pos // self.n
                    perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                take = min(self.micro - len(idx), self.n - pos % self.n)
                idx += perm[pos % self.n: pos % self.n + take].tolist()
                pos += take
            yield idx
            pos += (self.world - 1) * self.micro  # skip the other ranks' slices


def step_seed(*parts):
    """A 63-bit seed from (seed, step, micro-step): independent streams, reproducible on resume."""
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big") >> 1


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# ------------------------------------------------------------------------------ one step

def forward_backward(net, model, batches, gens, losses_kw, d):
    """One step's micro-steps (one per generator) into .grad -> its losses (itc, is_, rsc, total), on the device."""
    accum, micro_batches = len(gens), []  # all of the step's first: gradient caching embeds them before the micro-steps
    for _ in range(accum):
        images, captions = next(batches)  # pixels, or with --cache-latents Encoded
        images = images.to(d.device, non_blocking=True)
        if d.cuda and torch.is_tensor(images):  # the VAE's convolutions run fastest on NHWC pixels
            images = images.contiguous(memory_format=torch.channels_last)
        micro_batches.append((images, model.tokenizer(captions).to(d.device, non_blocking=True)))
    cache = None  # ITC and RSC contrast the whole step's batch, not a micro-batch: see losses.py
    if accum > 1 and (losses_kw["lambda_itc"] or losses_kw["lambda_rsc"]):
        with autocast(d.device):
            cache = model.contrastive_cache(micro_batches, gens, losses_kw["lambda_itc"], losses_kw["lambda_rsc"],
                                            losses_kw["t_max"])
    losses = torch.zeros(4, device=d.device)
    for a, (images, ids) in enumerate(micro_batches):
        with no_sync(net, a == accum - 1):
            with autocast(d.device):
                out = net(images, ids, generator=gens[a], cache=cache, micro_step=a, **losses_kw)
            (out["total"] / accum).backward()
        losses += torch.stack([out[k].detach().float() for k in ("itc", "is_", "rsc", "total")]) / accum
    return losses


def optimizer_step(opt, params, ema, step, max_grad_norm, ema_decay, start_params=None, l2sp=0.0, factor=1.0):
    """L2-SP, clipping, AdamW at the peak rates × factor, the EMA; a non-finite gradient skips it all -> 1.0 if so."""
    l2_sp_(params, start_params, l2sp)  # nothing when l2sp is 0
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm  # FSDP: replicated, the same on every rank
    if max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_grad_norm, norm)
    skipped = (~norm.isfinite()).float()
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor
    opt.found_inf = skipped  # decided on the device: weights, moments and EMA stay as they were
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:  # warm-up (t = steps before this one): the initial weights fade out early
        w = (1 - min(ema_decay, (1 + step) / (10 + step))) * (1 - skipped)
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], [w] * len(ema))
    return skipped


class Progress:
    """The losses since the last progress line, summed on the device: reading them is a host sync, done only at a
    line. Whether a step was skipped is read every step (one flag): add returns the skips in a row until now."""

    def __init__(self, device, steps, batch_size):
        self.steps, self.batch_size = steps, batch_size
        self.sums = torch.zeros(4, device=device)  # itc, is, rsc, total summed over the steps since the last line
        self.n = self.skipped = self.in_a_row = 0  # steps since the last line, those skipped; skipped in a row
        self.t_line, self.t_run, self.steps_run = time.time(), 0.0, 0

    def add(self, losses, skipped):
        skipped = int(skipped)
        self.sums += losses
        self.n, self.skipped, self.in_a_row = self.n + 1, self.skipped + skipped, (self.in_a_row + 1) * skipped
        return self.in_a_row

    def sync(self, step, factor, run, d):
        """The progress line up to `step`, logged too, the mean over ranks; stops the run when the loss is not finite."""
        if d.ddp:
            dist.all_reduce(self.sums)
        n, skipped = self.n, self.skipped
        mean = [x / n / d.world for x in self.sums.tolist()]
        elapsed = time.time() - self.t_line
        self.t_run, self.steps_run = self.t_run + elapsed, self.steps_run + n
        if not all(map(math.isfinite, mean)):
            raise stopped(run, f"the loss is not finite between steps {step - n + 1} and {step} "
                               f"(itc {mean[0]:.4g}, is {mean[1]:.4g}, rsc {mean[2]:.4g})")
        self.sums.zero_()
        self.skipped = self.n = 0
        log_line(run, {"step": step, **dict(zip(("itc", "is", "rsc", "total"), mean)), "lr": factor,
                       "img_s": n * self.batch_size / elapsed, "skipped": skipped})
        return (f"step {step}/{self.steps} | loss {mean[3]:.4f} (itc {mean[0]:.4f} is {mean[1]:.4f} rsc {mean[2]:.4f}) | "
                f"lr ×{factor:.3f} | {n * self.batch_size / elapsed:.1f} img/s | "
                f"ETA {fmt_time((self.steps - step) * self.t_run / self.steps_run)}"
                + (f" | skipped {skipped} of {n} steps (non-finite gradient)" if skipped else ""))


def skipped_out(step, run):
    return RunError(f"the gradient was not finite at each of the last {MAX_SKIPS} steps (up to step {step}); they were"
                    f" skipped, so the weights are intact: saved in {run / f'step_{step:06d}'} (--resume {run}). "
                    "Try lower learning rates (--lr-unet/--lr-clip) or --max-grad-norm.")


def stopped(run, what):
    last = checkpoints(run)
    return RunError(f"{what}. Stopped without saving; "
                    + (f"the last good checkpoint is {last[-1]} (--resume {run})" if last else "there is no checkpoint yet")
                    + ". Try lower learning rates (--lr-unet/--lr-clip) or --max-grad-norm.")


# ------------------------------------------------------------------------------ validation, checkpoints

def validate(model, params, shown, test_set, ood_set, step, run, res, d):
    """Test retrieval (in and out of domain) and a grid of test captions' samples (real, start, now), read with the
    weights checkpoints hold (`shown`: EMA, WiSE-FT) -> {split: retrieval} on rank 0."""
    found = {}
    if d.master or d.fsdp:  # sharded weights: every rank takes part in each forward, rank 0 writes
        model.eval()
        with swap_in(params, shown), autocast(d.device):
            found, picks, gen = measure(model, shown, test_set, ood_set, step, res)
        if d.fsdp:  # the root keeps its gathered weights after a forward without backward: free them
            model.reshard()
        model.train()
    if d.master:
        real = to_uint8(torch.stack([test_set[i][0] for i in picks]))
        log_validation(run, step, found, real, gen)  # the grid, the log, curves.png, TensorBoard
    d.barrier()
    return found


def measure(model, shown, test_set, ood_set, step, res):
    """Validation's forwards -> ({split: retrieval}, the sampled test captions' indices, their samples)."""
    found, picks = {}, distinct(test_set.captions, SAMPLE["n"])
    vision = model.clip.vision_model is not None  # retrieval embeds images: a text encoder alone only samples
    say(f"step {step} | validation: " + (f"embedding {len(test_set)} test pairs, then " if vision else "")
        + f"sampling {len(picks)} test captions ({SAMPLE['steps']} DDIM steps)")
    for name, ds in (("test", test_set), ("out of domain test", ood_set)):
        if ds is not None and vision:
            r = found[name] = retrieval(*embed(model, ds), ds.captions)
            say(f"step {step} | {name} retrieval, {len(ds)} pairs{' (saved weights)' if shown else ''}: "
                f"I→T R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} | "
                f"T→I {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} | chance R@1 {r['chance_r1']:.1f} (%)")
    gen = generate(model, [test_set.captions[i] for i in picks], SAMPLE["steps"], SAMPLE["guidance"], 0, res,
                   batch=SAMPLE["n"])  # one batch: at most n captions
    return found, picks, gen


def distinct(captions, n):
    """Indices of the first n items with different captions (a sample grid of n different prompts)."""
    first = {}
    for i, c in enumerate(captions):
        first.setdefault(c, i)
    return list(first.values())[:n]


def save(model, named, opt, shown, step, seen, run, cfg, d):
    """A checkpoint (rank 0 writes it) with the run's settings; the run stops if the weights are not finite."""
    if not all_finite([p for _, p in named] + (shown or []), d):  # every rank knows: all stop together
        raise stopped(run, f"the weights are not finite after step {step}")
    tensors = optimizer_tensors(opt, named)
    if d.fsdp:  # gathered whole, in the layouts a run without FSDP writes
        model, named, tensors, shown = whole(model, named, tensors, shown, d)
    if d.master:
        state = {"step": step, "samples_seen": seen, "world": d.world, "args": vars(cfg),
                 "rng": "derived: a generator seeded by (seed, step, micro-step) each micro-step"}
        say(f"step {step} | saved {save_checkpoint(run, step, model, named, tensors, shown, state)}")
    d.barrier()


if __name__ == "__main__":
    sys.exit(main())
