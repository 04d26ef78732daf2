"""Fine-tune CLIP and Stable Diffusion together with ITC + IS + RSC: the plain PyTorch loop.

    python train.py --data demo                    # tiny model, synthetic garments, CPU, a few minutes
    python train.py --data fashion_woman           # SD 1.5 + CLIP ViT-L/14 (weights fetched once)
    torchrun --nproc_per_node=8 train.py --data fashion_woman   # DDP: the same run, 8 GPUs
    python train.py --resume runs/fashion_woman    # continue exactly where it stopped

A run folder holds `run.json` (where the run started: eval.py's judge), `samples/` (a PNG grid
per validation) and one folder per checkpoint, `step_000500/`, each complete on its own: the
model in the public layouts (diffusers folder + `clip/` transformers folder, see UniDiff.save;
with --ema they hold the EMA weights and `live.safetensors` the trained ones), `optimizer.safetensors`
and `state.json` (step, data position, arguments). Nothing is pickled. A checkpoint is written to a
hidden temp folder, then renamed. Ctrl-C or SIGTERM: the step under way finishes, is saved, and the
run stops (all DDP ranks at the same step).

`--batch-size` is the global batch of one optimizer step: it is split over the DDP ranks and
the `--grad-accum` micro-steps, so one GPU and eight give the same run. The data order is a
seeded permutation per epoch, and each micro-step's randomness (timesteps, noise, caption
dropout) comes from a generator seeded by (seed, step, micro-step), the same on every rank
(UniDiff.losses draws for the global batch and keeps the rank's rows): resuming at step N
restores both exactly, with nothing to store but N.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from data import TEST_FRACTION, DataError, open_dataset
from unidiff import UniDiff
from weights import WeightsError, pretrained, read_safetensors, save_safetensors

# Defaults of a real fine-tune (SD 1.5 + CLIP-L at 512 px), and what the tiny model changes on any data:
# random init (high learning rates) and CPU-sized (32 px, a few minutes). The help text is built from these.
DEFAULTS = dict(data=None, model="sd15", weights=None, steps=2000, batch_size=16, out=None, save_every=500,
                eval_every=250, seed=0, lambda_itc=1.0, lambda_is=1.0, lambda_rsc=0.1, rsc_t_max=500,
                snr_gamma=None, caption_dropout=0.1,  # classifier-free guidance needs the empty caption trained
                lr_unet=1e-5, lr_clip=1e-6, train="unet,text,vision", grad_accum=1, grad_ckpt=False, ema=0.0,
                warmup=100, compile=False, workers=None, res=512, max_grad_norm=1.0, vae_steps=200)
TINY = dict(steps=300, batch_size=32, res=32, lr_unet=2e-3, lr_clip=1e-3, save_every=100, eval_every=50, warmup=20)
LOG_EVERY = 10  # steps between progress lines (and NaN checks: the only host syncs)
# Non-finite gradients in a row that stop the run: one odd batch is skipped and forgotten, but a whole
# progress line of them means every batch now diverges (learning rate too high): skipping only burns time.
MAX_SKIPS = LOG_EVERY
PROGRESS_EVERY = 5  # seconds between progress lines of long work without steps to count (the tiny VAE fit)
SAMPLE = dict(n=8, steps=25, guidance=5.0)  # the validation grid: 8 test captions, 25 DDIM steps


class RunError(Exception):
    """A problem that stops the run cleanly; the message says what happened and what to do."""


def defaults(model):
    """The defaults of a run of `model`: the tiny model's apply on any data."""
    return {**DEFAULTS, **(TINY if model == "tiny" else {}), "model": model}


def default_text(key):
    """e.g. 'default 2000; tiny 300', from DEFAULTS and TINY: the help says what the code does."""
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    return f"default {show(DEFAULTS[key])}" + (f"; tiny {show(TINY[key])}" if key in TINY else "")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    def add(flag, help, **kw):
        if "{default}" in help:
            help = help.replace("{default}", default_text(flag[2:].replace("-", "_")))
        p.add_argument(flag, default=None, help=help, **kw)
    add("--data", "a preset (fashion_woman, fashion_man, ecommerce_product, demo) or a folder; a folder's test\n"
        f"split is its metadata's split column, else a seeded {TEST_FRACTION:.0%}% of its groups (see data.py)")
    add("--model", "sd15: SD 1.5 + CLIP ViT-L/14; tiny: random, CPU-sized, with its own defaults\n"
        "({default}; --data demo implies tiny)", choices=["sd15", "tiny"])
    add("--weights", "folder of the pretrained weights, or an SD 1.x single-file .safetensors "
        "(default: $UNIDIFF_WEIGHTS, else weights/)")
    add("--steps", "optimizer steps in all ({default})", type=int)
    add("--batch-size", "global batch per optimizer step, over all ranks and micro-steps ({default})", type=int)
    add("--out", "the run folder (default runs/<data>)")
    add("--save-every", "steps between checkpoints ({default}; 0: only at the end)", type=int)
    add("--eval-every", "steps between validations: test retrieval + a sample grid ({default}; 0: none)", type=int)
    add("--seed", "seed of the data order, noise and (tiny) the initial weights ({default})", type=int)
    add("--resume", "continue the run in this folder from its latest checkpoint (flags given again override)")
    add("--lambda-itc", "weight of the image-text contrastive loss ({default})", type=float)
    add("--lambda-is", "weight of the image-synthesis (diffusion) loss ({default})", type=float)
    add("--lambda-rsc", "weight of the reciprocal semantic consistency loss ({default})", type=float)
    add("--rsc-t-max", "RSC uses the samples with timestep t < this ({default})", type=int)
    add("--snr-gamma", "min-SNR-γ weighting of the diffusion loss, e.g. 5 (default: none, the plain MSE)", type=float)
    add("--caption-dropout", "probability of training a sample on the empty caption ({default})", type=float)
    add("--lr-unet", "peak learning rate of the UNet ({default})", type=float)
    add("--lr-clip", "peak learning rate of CLIP, both towers ({default})", type=float)
    add("--train", "the parts that train, comma-separated from unet,text,vision ({default})")
    add("--grad-accum", "micro-steps per optimizer step ({default}): less memory, the same global batch; ITC and RSC\n"
        "still contrast all of it (gradient caching: one more no-grad CLIP forward per step). Left out: RSC's\n"
        "gradient into a caption from the other micro-steps' RSC rows (README: Gradient accumulation)", type=int)
    add("--grad-ckpt", "gradient checkpointing: recompute activations in backward (less memory, ~30%% slower)",
        action="store_const", const=True)
    add("--ema", "EMA decay of the trained weights, e.g. 0.9999 ({default}: no EMA)", type=float)
    add("--warmup", "linear warm-up steps before the cosine decay ({default})", type=int)
    add("--compile", "torch.compile each network (UniDiff.compile); minutes of compiling first",
        action="store_const", const=True)
    add("--workers", "data loader processes per rank (default 4 on GPU, 0 on CPU)", type=int)
    add("--res", "training resolution in pixels ({default})", type=int)
    add("--max-grad-norm", "clip the gradient norm to this ({default}; 0: no clipping)", type=float)
    add("--vae-steps", "tiny only: steps fitting its random VAE as an autoencoder first ({default})", type=int)
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "resume" in given:  # the run's own arguments, then whatever was given again
        ckpt = latest_checkpoint(given["resume"])
        state = json.loads((ckpt / "state.json").read_text())
        # defaults first: a run saved before a flag existed gets that flag's default; new checkpoints go beside it
        args = {**defaults(state["args"]["model"]), **state["args"], **given, "out": str(ckpt.parent)}
    else:
        if "data" not in given:
            p.error("--data is required (a preset, a folder, or demo), or --resume RUN_DIR")
        model = given.get("model", "tiny" if given["data"] == "demo" else DEFAULTS["model"])
        args = {**defaults(model), **given}
        args["out"] = args["out"] or str(Path("runs") / Path(args["data"]).name)
        args["resume"] = None
    if not 0 <= args["caption_dropout"] <= 1:
        p.error(f"--caption-dropout {args['caption_dropout']}: a probability, from 0 to 1")
    if args["snr_gamma"] is not None and args["snr_gamma"] <= 0:
        p.error(f"--snr-gamma {args['snr_gamma']}: must be > 0 (e.g. 5), or left out for the plain MSE")
    return argparse.Namespace(**args)


# ------------------------------------------------------------------------------ run folders

def checkpoints(run):
    """The complete `step_*` folders of a run folder, oldest first (by number: step_1000000 > step_999999)."""
    steps = [p for p in Path(run).glob("step_*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def latest_checkpoint(path):
    """A checkpoint folder, or the newest complete `step_*` folder of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    steps = checkpoints(path)
    if not steps:
        raise RunError(f"{path}: no checkpoint here (expected a run folder with step_* folders, or one of them)")
    return steps[-1]


def load_model(path, weights=None):
    """(UniDiff, checkpoint folder, "ema" or "live") for a run folder or a checkpoint. `weights`: "ema",
    "live", or None: what its model folders hold (the EMA when the run had --ema; `live.safetensors` then
    holds the trained weights)."""
    ckpt = latest_checkpoint(path)
    live = ckpt / "live.safetensors"
    if weights == "ema" and not live.is_file():
        raise RunError(f"{ckpt} has no EMA weights (its run trained without --ema): use --weights live")
    model = UniDiff.from_pretrained(ckpt)
    if weights == "live" and live.is_file():
        load_params(model, read_safetensors(live))
    return model, ckpt, weights or ("ema" if live.is_file() else "live")


def load_params(model, tensors):
    """Copy named tensors (a subset of the model's parameters) into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def load_start(run):
    """The model a run started from (eval.py's pretrained side and CLIP-score judge), and its name."""
    run = Path(run if (Path(run) / "run.json").is_file() else latest_checkpoint(run).parent)
    if not (run / "run.json").is_file():
        raise RunError(f"{run}/run.json not found: it records the model the run started from (the pretrained "
                       "side of the table and the CLIP-score judge); pass a checkpoint inside its run folder")
    start = json.loads((run / "run.json").read_text())["start"]
    if "init" in start:
        return UniDiff.from_pretrained(run / start["init"]), f"{start['model']} initial weights ({run / start['init']})"
    return UniDiff.from_pretrained(start["sd"], clip=start["clip"]), f"pretrained {start['sd']} + {start['clip']}"


def save_checkpoint(run, step, model, named, opt, ema, state):
    """Write `run/step_XXXXXX/` atomically: into a hidden temp folder, renamed when complete. The model
    folders (what diffusers, transformers and ComfyUI open) hold the EMA weights when there are some, as
    sample.py and eval.py use by default; `live.safetensors` then holds the trained ones (for --resume)."""
    final, tmp = run / f"step_{step:06d}", run / f".step_{step:06d}.tmp"
    if final.exists():
        return final
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with swap_in([p for _, p in named], ema):
            model.save(tmp)
        save_safetensors(optimizer_tensors(opt, named), tmp / "optimizer.safetensors")
        if ema is not None:
            save_safetensors(dict(named), tmp / "live.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        if isinstance(e, OSError):
            prev = checkpoints(run)
            raise RunError(f"could not write checkpoint {final} ({e.strerror or e}); nothing was lost: "
                           + (f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint")
                           + ". Free some disk space and --resume.") from None
        raise
    return final


def optimizer_tensors(opt, named):
    """AdamW's state as flat named tensors (`<param>.exp_avg`, ...): safetensors, not a pickle."""
    out = {}
    for name, p in named:
        for k, v in opt.state.get(p, {}).items():
            out[f"{name}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer(opt, named, tensors):
    by_index = {}
    for i, (name, _) in enumerate(named):  # state_dict() numbers the parameters in group order, as `named`
        keys = [k for k in ("step", "exp_avg", "exp_avg_sq") if f"{name}.{k}" in tensors]
        if keys:
            by_index[i] = {k: tensors[f"{name}.{k}"] for k in keys}
    opt.load_state_dict({"state": by_index, "param_groups": opt.state_dict()["param_groups"]})


# ------------------------------------------------------------------------------ data order

class Batches(torch.utils.data.Sampler):
    """Index lists of this rank's micro-batches, from position `start` of the endless stream of
    seeded per-epoch permutations. Global micro-batch k is positions [k·world·b, (k+1)·world·b);
    rank r takes its r-th slice, so any world size reads the same samples per step."""

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


def to_uint8(pixels):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(rows, path):
    """rows: list of uint8 (N, H, W, 3) -> one PNG, a row each, written atomically."""
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()  # (rows·H, N·W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------ the run

def main(argv=None):
    try:
        args = parse_args(argv)
        return train(args)
    except (DataError, WeightsError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args):
    from eval import embed, retrieval  # the metrics live in eval.py

    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    master = rank == 0
    say = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()  # CPU: fp32
    run = Path(args.out)

    micro, rem = divmod(args.batch_size, world * args.grad_accum)
    if rem or not micro:
        raise RunError(f"--batch-size {args.batch_size} must be a multiple of ranks × --grad-accum "
                       f"= {world} × {args.grad_accum}")
    parts = args.train.split(",")
    if not parts or set(parts) - {"unet", "text", "vision"}:
        raise RunError(f"--train {args.train!r}: choose from unet, text, vision (comma-separated)")

    # -- data
    splits = ("train", "test") if args.eval_every else ("train",)  # only validation reads the test rows
    sets = {split: open_dataset(args.data, split, args.res) for split in splits}
    train_set, test_set = sets["train"], sets.get("test")
    if master:  # what was skipped, converted, truncated at 77 tokens: counted, never silent
        from clip import Tokenizer
        seen = set()
        for split, ds in sets.items():
            for line in ds.report(Tokenizer().lengths):
                if line not in seen:
                    say(f"data ({split}): {line}")
                    seen.add(line)

    # -- model: a checkpoint, or where the run starts
    ckpt = latest_checkpoint(args.resume) if args.resume else None
    if ckpt is None and any(run.glob("step_*")):
        raise RunError(f"{run} already holds checkpoints: continue it with --resume {run}, or pick another --out")
    if ckpt is not None and ckpt.name != checkpoints(run)[-1].name:
        raise RunError(f"{run} holds checkpoints after {ckpt.name} (the latest is {checkpoints(run)[-1].name}): "
                       f"continuing from {ckpt.name} would mix two runs there; move the later ones out first")
    if ckpt is not None:
        say(f"resuming from {ckpt}")
        model = UniDiff.from_pretrained(ckpt)
    elif args.model == "tiny":
        # v-prediction: a UNet trained for minutes predicts ε poorly at high noise, and x̂0 = (z_t − √(1-ᾱ) ε̂) / √ᾱ
        # multiplies that error by up to 15 (t = 999); sampling starts there. v keeps x̂0's error bounded.
        model = UniDiff.tiny(seed=args.seed, v_prediction=True)
        fit_vae(model.vae, train_set, args.vae_steps, args.seed, say)
    else:
        if master:
            pretrained(args.weights)  # one rank downloads; the others wait, then read
        if ddp:
            dist.barrier()
        sd_path, clip_path = pretrained(args.weights)
        model = UniDiff.from_pretrained(sd_path, clip=clip_path)
    if model.clip.vision_model is None and (args.lambda_itc or args.lambda_rsc):
        raise RunError("ITC and RSC need a CLIP with a vision tower; this model has a text encoder only")
    if ckpt is None and master:
        run.mkdir(parents=True, exist_ok=True)
        if args.model == "tiny":  # random weights: keep them, they are the run's "pretrained" model
            shutil.rmtree(run / "init", ignore_errors=True)
            model.save(run / "init")
            start = {"model": "tiny", "seed": args.seed, "init": "init"}
        else:
            start = {"model": "sd15", "sd": str(sd_path.resolve()), "clip": str(clip_path.resolve())}
        (run / "run.json").write_text(json.dumps({"start": start, "args": vars(args)}, indent=2))

    model.to(device)
    if cuda:  # convolutions run fastest on NHWC tensors
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    model.unet.grad_ckpt = model.clip.grad_ckpt = model.vae.grad_ckpt = bool(args.grad_ckpt)
    model.requires_grad_(False)
    towers = {"unet": [model.unet], "text": [model.clip.text_model, model.clip.text_projection],
              "vision": [model.clip.vision_model, model.clip.visual_projection]}
    for part in parts:
        for m in towers[part]:
            m.requires_grad_(True)
    if {"text", "vision"} & set(parts):
        model.clip.logit_scale.requires_grad_(True)
    # Per-part learning rates; no weight decay on biases, norms and the logit scale (1-d tensors).
    groups = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(("unet" if n.startswith("unet.") else "clip", p.ndim >= 2), []).append((n, p))
    named = [np_ for g in groups.values() for np_ in g]  # in group order: the optimizer numbers them so
    params = [p for _, p in named]
    lrs = {"unet": args.lr_unet, "clip": args.lr_clip}
    opt = torch.optim.AdamW([{"params": [p for _, p in g], "base_lr": lrs[part], "lr": lrs[part],
                              "weight_decay": 1e-2 if decay else 0.0} for (part, decay), g in groups.items()],
                            betas=(0.9, 0.999), eps=1e-8, fused=True)  # fused: can skip a step on device (found_inf)
    ema = [p.detach().float().clone() for p in params] if args.ema else None  # resuming: the checkpoint's EMA
    step = 0
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        step = state["step"]
        load_optimizer(opt, named, read_safetensors(ckpt / "optimizer.safetensors"))
        if (ckpt / "live.safetensors").is_file():  # the model folders held the EMA: now the weights that train
            load_params(model, read_safetensors(ckpt / "live.safetensors"))
    say(f"model: {args.model}, training {', '.join(parts)} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters); "
        f"global batch {args.batch_size} = {world} rank(s) × {args.grad_accum} micro-step(s) × {micro}; "
        f"{args.res} px; {'bf16 autocast on ' + torch.cuda.get_device_name(device) if cuda else 'fp32 on CPU'}")

    losses_kw = dict(lambda_itc=args.lambda_itc, lambda_is=args.lambda_is, lambda_rsc=args.lambda_rsc,
                     t_max=args.rsc_t_max, snr_gamma=args.snr_gamma, p_uncond=args.caption_dropout)
    if args.compile:
        model.compile()  # each network in place, before DDP sees it (UniDiff.compile)
    net = model
    if ddp:  # a λ of 0 leaves parts without gradient: DDP must then look for unused parameters
        net = DDP(model, device_ids=[device.index] if cuda else None, broadcast_buffers=False,
                  find_unused_parameters=not all(losses_kw[k] for k in ("lambda_itc", "lambda_is", "lambda_rsc")))

    workers = args.workers if args.workers is not None else (4 if cuda else 0)
    loader = DataLoader(train_set, batch_sampler=Batches(len(train_set), micro, world, rank, args.seed,
                                                         step * args.batch_size),
                        num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                        worker_init_fn=ignore_signals)
    batches = iter(loader)
    tokenizer = model.tokenizer

    def stopped(what):
        last = checkpoints(run)
        return RunError(f"{what}. Stopped without saving; "
                        + (f"the last good checkpoint is {last[-1]} (--resume {run})" if last
                           else "there is no checkpoint yet")
                        + ". Try lower learning rates (--lr-unet/--lr-clip) or --max-grad-norm.")

    def validate():
        if master:
            model.eval()
            with swap_in(params, ema), amp:
                picks = distinct(test_set.captions, SAMPLE["n"])
                say(f"step {step} | validation: embedding {len(test_set)} test pairs, then sampling "
                    f"{len(picks)} test captions ({SAMPLE['steps']} DDIM steps)")
                img, txt = embed(model, test_set)
                r = retrieval(img, txt, test_set.captions)
                say(f"step {step} | test retrieval, {len(test_set)} pairs{' (EMA)' if ema else ''}: "
                    f"I→T R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} | "
                    f"T→I {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} | chance R@1 {r['chance_r1']:.1f} (%)")
                real = to_uint8(torch.stack([test_set[i][0] for i in picks]))
                gen = model.generate([test_set.captions[i] for i in picks], steps=SAMPLE["steps"],
                                     guidance=SAMPLE["guidance"], seed=0, height=args.res, width=args.res)
            save_grid([real, gen], run / "samples" / f"step_{step:06d}.png")
            model.train()
        if ddp:
            dist.barrier()

    def save():
        tensors = params + (ema or [])  # every rank checks (the same weights), so all stop together
        if not torch.stack([t.isfinite().all() for t in tensors]).all():
            raise stopped(f"the weights are not finite after step {step}")
        if master:
            state = {"step": step, "samples_seen": step * args.batch_size, "world": world, "args": vars(args),
                     "rng": "derived: a generator seeded by (seed, step, micro-step) each micro-step"}
            say(f"step {step} | saved {save_checkpoint(run, step, model, named, opt, ema, state)}")
        if ddp:
            dist.barrier()

    # Ctrl-C or SIGTERM (schedulers, torchrun): finish the step, save, exit; a second one exits at once.
    # The ranks agree after every step (torchrun kills them 30 s after forwarding the signal).
    stop = [0]  # the signal's number
    stop_group = dist.new_group(backend="gloo") if ddp else None  # the flag goes host to host: no GPU sync
    def on_signal(signum, _):
        stop[0] = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (a second Ctrl-C or SIGTERM "
            "quits without saving)")
    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    try:
        if step == 0 and args.eval_every:
            validate()
        sums = torch.zeros(4, device=device)  # itc, is, rsc, total summed over the steps since the last line
        skips = torch.zeros(2, device=device)  # steps skipped since the last line, and in a row until now
        n_sum, t_line, t_run, steps_run = 0, time.time(), 0.0, 0
        while step < args.steps:
            factor = lr_factor(step, args.warmup, args.steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            micro_batches = []  # all of the step's first: gradient caching embeds them before the micro-steps
            for a in range(args.grad_accum):
                pixels, captions = next(batches)
                pixels = pixels.to(device, non_blocking=True)
                if cuda:
                    pixels = pixels.contiguous(memory_format=torch.channels_last)
                micro_batches.append((pixels, tokenizer(captions).to(device, non_blocking=True)))
            gens = [torch.Generator().manual_seed(step_seed(args.seed, step, a))  # on the host: see UniDiff.losses
                    for a in range(args.grad_accum)]
            cache = None  # ITC and RSC contrast the whole step's batch, not a micro-batch: see losses.py
            if args.grad_accum > 1 and (args.lambda_itc or args.lambda_rsc):
                with amp:
                    cache = model.contrastive_cache(micro_batches, gens, args.lambda_itc, args.lambda_rsc,
                                                    args.rsc_t_max)
            for a, (pixels, ids) in enumerate(micro_batches):
                sync = nullcontext() if not ddp or a == args.grad_accum - 1 else net.no_sync()
                with sync:
                    with amp:
                        out = net(pixels, ids, generator=gens[a], cache=cache, micro_step=a, **losses_kw)
                    (out["total"] / args.grad_accum).backward()
                sums += torch.stack([out[k].detach().float() for k in ("itc", "is_", "rsc", "total")]) / args.grad_accum
            # A non-finite gradient (the loss can still be finite) skips the step: AdamW's found_inf leaves
            # weights and moments as they were, decided on the device (no host sync); the EMA waits too.
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if args.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, norm)
            bad = (~norm.isfinite()).float()  # 0-dim, 1.0: skip
            opt.found_inf = bad
            opt.step()
            opt.zero_grad(set_to_none=True)
            skips[0] += bad
            skips[1] = (skips[1] + 1) * bad
            if ema is not None:  # warm-up (t = steps before this one): the initial weights fade out early
                w = (1 - min(args.ema, (1 + step) / (10 + step))) * (1 - bad)
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], [w] * len(ema))
            step, n_sum = step + 1, n_sum + 1
            stopping = stop[0]  # read once: a signal arriving from here on counts for the next step
            if ddp:  # whichever rank got the signal, all stop after this same step
                flag = torch.tensor([stopping])
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=stop_group)
                stopping = int(flag)
            at_eval = bool(args.eval_every) and (step % args.eval_every == 0 or step == args.steps)
            at_save = step == args.steps or bool(args.save_every) and step % args.save_every == 0
            if step % LOG_EVERY and not (at_eval or at_save or stopping):
                continue
            # -- a sync point: progress line, NaN and skipped-step checks
            flags = torch.cat([sums, skips])
            if ddp:
                dist.all_reduce(flags)
            flags = (flags / world).tolist()
            mean, skipped, in_a_row = [x / n_sum for x in flags[:4]], round(flags[4]), round(flags[5])
            elapsed = time.time() - t_line
            t_run, steps_run = t_run + elapsed, steps_run + n_sum
            if not all(map(math.isfinite, mean)):
                raise stopped(f"the loss is not finite between steps {step - n_sum + 1} and {step} "
                              f"(itc {mean[0]:.4g}, is {mean[1]:.4g}, rsc {mean[2]:.4g})")
            if in_a_row >= MAX_SKIPS:
                raise stopped(f"the gradient was not finite at each of the last {in_a_row} steps (up to step "
                              f"{step}; skipped, so the weights are intact)")
            say(f"step {step}/{args.steps} | loss {mean[3]:.4f} (itc {mean[0]:.4f} is {mean[1]:.4f} rsc {mean[2]:.4f}) | "
                f"lr ×{factor:.3f} | {n_sum * args.batch_size / elapsed:.1f} img/s | "
                f"ETA {fmt_time((args.steps - step) * t_run / steps_run)}"
                + (f" | skipped {skipped} of {n_sum} steps (non-finite gradient)" if skipped else ""))
            sums.zero_()
            skips[0] = 0
            n_sum = 0
            if stopping:
                save()
                say(f"stopped at step {step}: continue with  python train.py --resume {run}")
                return 128 + stopping  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
            if at_eval:
                validate()
            if at_save:
                save()
            t_line = time.time()
        say(f"done: {step} steps; checkpoints in {run}/, samples in {run / 'samples'}/")
        return 0
    finally:
        for s, handler in old_handlers.items():
            signal.signal(s, handler)


def fit_vae(vae, dataset, steps, seed, say, batch=16, lr=3e-3):
    """Fit a random (tiny) VAE as an autoencoder: SD's VAE comes pretrained, and a random decoder
    would turn every latent, however well the UNet learns, into noise. Then, as SD did, set its
    scaling factor so the latents the UNet sees have unit variance. Deterministic in `seed`."""
    if not steps:
        return
    t0, crop = time.time(), max(8, dataset[0][0].shape[-1] // 2)
    say(f"fitting the tiny VAE as an autoencoder: {steps} steps on {crop} px crops")
    t_said = t0
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.stack([dataset[i][0] for i in torch.randint(0, len(dataset), (batch,), generator=g).tolist()])
        top, left = torch.randint(0, x.shape[-1] - crop + 1, (2,), generator=g).tolist()
        x = x[..., top:top + crop, left:left + crop]  # convolutions are local: half-size crops, 4x cheaper
        mean, logvar = vae.encode(x)
        z = mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()  # keeps the posterior a distribution
        mse = (vae.decode(z) - x).pow(2).mean()
        (mse + 1e-4 * kl).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if time.time() - t_said >= PROGRESS_EVERY:
            t_said = time.time()
            say(f"tiny VAE: step {step + 1}/{steps}, reconstruction MSE {mse.item():.4f} ({t_said - t0:.0f}s)")
    vae.requires_grad_(False)
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))])
        std = vae.encode(x)[0].std().item()
    vae.cfg = dataclasses.replace(vae.cfg, scaling_factor=1 / std)  # saved in config.json, as SD's 0.18215
    say(f"tiny VAE fitted as an autoencoder: {steps} steps, reconstruction MSE {mse.item():.4f}, "
        f"scaling factor {1 / std:.4f} ({time.time() - t0:.0f}s)")


class swap_in:
    """Temporarily put the EMA weights into the model (validation), then restore the live ones."""

    def __init__(self, params, ema):
        self.params, self.ema = params, ema

    def __enter__(self):
        if self.ema is not None:
            self.live = [p.detach().clone() for p in self.params]
            torch._foreach_copy_([p.data for p in self.params], self.ema)

    def __exit__(self, *exc):
        if self.ema is not None:
            torch._foreach_copy_([p.data for p in self.params], self.live)


def ignore_signals(worker_id):
    """DataLoader workers share the terminal's (or torchrun's) process group: Ctrl-C and SIGTERM reach
    them too, and a dead worker would stop the run before it saves. The main process handles both."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def distinct(captions, n):
    """Indices of the first n items with different captions (a sample grid of n different prompts)."""
    seen, out = set(), []
    for i, c in enumerate(captions):
        if c not in seen:
            seen.add(c)
            out.append(i)
            if len(out) == n:
                break
    return out


if __name__ == "__main__":
    sys.exit(main())
