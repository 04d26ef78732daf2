"""Fine-tune CLIP and Stable Diffusion together with ITC + IS + RSC: the plain PyTorch loop.

    python train.py --data demo                    # the shipped tiny model, fine-tuned on a synthetic domain
    python train.py --data fashion_woman           # SD 1.5 + CLIP ViT-L/14 (weights fetched once)
    torchrun --nproc_per_node=8 train.py --data fashion_woman   # DDP: the same run, 8 GPUs
    python train.py --resume runs/fashion_woman    # continue exactly where it stopped

The run folder (its layout: runs.py) gets a checkpoint every --save-every steps, each complete
on its own and written atomically, and a sample grid per validation. Nothing is pickled. Ctrl-C or
SIGTERM: the step under way finishes, is saved, and the run stops (all DDP ranks at the same step).

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
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Subset

from clip import Tokenizer
from data import TEST_FRACTION, DataError, open_dataset, parse_res, res_name
from eval import embed, retrieval
from latent_cache import CachedSet, cache_file, create, layout, write_rows
from lora import attention_lora
from runs import (RunError, autocast, check_size, checkpoints, latest_checkpoint, load_checkpoint, load_lora,
                  load_row, read_state, save_checkpoint, save_grid, save_start, swap_in, to_uint8)
from unidiff import UniDiff
from weights import WeightsError, pretrained

# Defaults of a real fine-tune (SD 1.5 + CLIP-L at 512 px); what the tiny model changes on any data: random
# init (high learning rates) and CPU-sized (32 px, a few minutes); and what the demo changes: it fine-tunes the
# shipped pretrained tiny model on the demo's narrow domain and measures what it forgets on the broad world it
# was pretrained on. The help text is built from these.
DEFAULTS = dict(data=None, model="sd15", weights=None, steps=2000, batch_size=16, out=None, save_every=500,
                eval_every=250, seed=0, lambda_itc=1.0, lambda_is=1.0, lambda_rsc=0.1, rsc_t_max=500,
                snr_gamma=None, caption_dropout=0.1,  # classifier-free guidance needs the empty caption trained
                rsc_one_way=False, lr_unet=1e-5, lr_clip=1e-6, train="unet,text,vision", grad_accum=1, grad_ckpt=False,
                ema=0.0, warmup=100, compile=False, workers=None, res=512, max_grad_norm=1.0, vae_steps=200, ood_data=None,
                lora=None, lora_alpha=None, cache_latents=False, train_size=None)
TINY = dict(steps=300, batch_size=32, res=32, lr_unet=2e-3, lr_clip=1e-3, save_every=100, eval_every=50, warmup=20)
PRETRAINED_TINY = Path(__file__).resolve().parent / "assets" / "unidiff-tiny"  # made as the README says
# The demo keeps the tiny learning rates: of three pairs, the best in-domain validation R@1 (README: the claim
# in miniature).
DEMO = dict(weights=str(PRETRAINED_TINY), steps=200, ood_data="world")
# The fashion presets are portrait photos (750x1101, 1080x1440): a square crop cuts off heads or shoes.
FASHION = dict(res="512x768")  # SD 1.5's 512 wide, 2:3 (README: Resolution)
FASHION_DATA = ("fashion_woman", "fashion_man", "ecommerce_product")
LOG_EVERY = 10  # steps between progress lines (and NaN checks: the only host syncs)
# Non-finite gradients in a row that stop the run: one odd batch is skipped and forgotten, but a whole
# progress line of them means every batch now diverges (learning rate too high): skipping only burns time.
MAX_SKIPS = LOG_EVERY
PROGRESS_EVERY = 5  # seconds between progress lines of long work without steps to count (the tiny VAE fit)
SAMPLE = dict(n=8, steps=25, guidance=5.0)  # the validation grid: 8 test captions, 25 DDIM steps


def defaults(model, data):
    """The defaults of a run of `model` on `data`: the fashion presets' portrait resolution, the tiny model's on any
    data (square 32 px), the demo's on top."""
    tiny = TINY if model == "tiny" else {}
    fashion = FASHION if data in FASHION_DATA else {}
    return {**DEFAULTS, **fashion, **tiny, **(DEMO if tiny and data == "demo" else {}), "model": model}


def default_text(key):
    """e.g. 'default 2000; tiny 300; demo 200', from DEFAULTS, FASHION, TINY and DEMO: the help says what the code
    does."""
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    named = (("fashion", FASHION), ("tiny", TINY), ("demo", DEMO))
    return f"default {show(DEFAULTS[key])}" + "".join(f"; {name} {show(d[key])}" for name, d in named if key in d)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    def add(flag, help, **kw):
        if "{default}" in help:
            help = help.replace("{default}", default_text(flag[2:].replace("-", "_")))
        p.add_argument(flag, default=None, help=help, **kw)
    add("--data", "a preset (fashion_woman, fashion_man, ecommerce_product, world, demo) or a folder; a folder's test\n"
        f"split is its metadata's split column, else a seeded {TEST_FRACTION:.0%}% of its groups (see data.py)")
    add("--model", "sd15: SD 1.5 + CLIP ViT-L/14; tiny: CPU-sized, with its own defaults\n"
        "({default}; --data demo implies tiny)", choices=["sd15", "tiny"])
    add("--weights", "sd15: folder of the pretrained weights, or an SD 1.x single-file .safetensors (default:\n"
        "$UNIDIFF_WEIGHTS, else weights/); tiny: a saved UniDiff folder to start from (default: random weights,\n"
        "the VAE fitted first; demo: this repo's assets/unidiff-tiny, the shipped pretrained tiny model)")
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
    add("--rsc-one-way", "RSC's first KL term alone: only the generated image learns from it (an ablation)",
        action="store_const", const=True)
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
    add("--res", "training resolution: WIDTHxHEIGHT in pixels, or one number for a square ({default});\n"
        f"fashion: the portrait presets {', '.join(FASHION_DATA)}. Sides in multiples of 64 (tiny: 4)")
    add("--max-grad-norm", "clip the gradient norm to this ({default}; 0: no clipping)", type=float)
    add("--vae-steps", "tiny only: steps fitting its random VAE as an autoencoder first ({default})", type=int)
    add("--lora", "train low-rank adapters of this rank (e.g. 8) on the attention projections of the --train parts,\n"
        "their weights frozen (lora.py; default none: the weights themselves train)", type=int)
    add("--lora-alpha", "the adapters' update is scaled by alpha / rank (default: the rank, a scale of 1)", type=float)
    add("--cache-latents", "encode the training images once with the frozen VAE (and CLIP's view of them) into\n"
        "latent-cache/ beside the run folder, which later runs and --resume reuse: the steps skip the VAE encoder\n"
        "(README: Cached latents)", action="store_const", const=True)
    add("--train-size", "train on the first N items of the training split (default: all of them)", type=int)
    add("--ood-data", "validation also reports retrieval on this data's test split: what fine-tuning forgets\n"
        "out of its domain (default none; demo world)")
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "resume" in given:  # the run's own arguments, then whatever was given again
        ckpt = latest_checkpoint(given["resume"])
        state = read_state(ckpt)
        # defaults first: a run saved before a flag existed gets that flag's default; new checkpoints go beside it
        args = {**defaults(state["args"]["model"], state["args"]["data"]), **state["args"], **given,
                "out": str(ckpt.parent)}
    else:
        if "data" not in given:
            p.error("--data is required (a preset, a folder, or demo), or --resume RUN_DIR")
        model = given.get("model", "tiny" if given["data"] == "demo" else DEFAULTS["model"])
        args = {**defaults(model, given["data"]), **given}
        args["out"] = args["out"] or str(Path("runs") / Path(args["data"]).name)
        args["resume"] = None
    try:  # stored as --res writes it: a square's 512 as before, else "512x768"
        args["res"] = res_name(parse_res(args["res"]))
    except ValueError as e:
        p.error(f"--res: {e}")
    if not 0 <= args["caption_dropout"] <= 1:
        p.error(f"--caption-dropout {args['caption_dropout']}: a probability, from 0 to 1")
    if args["grad_accum"] < 1:
        p.error(f"--grad-accum {args['grad_accum']}: micro-steps per optimizer step, at least 1")
    if args["lora"] is not None and args["lora"] < 1:
        p.error(f"--lora {args['lora']}: the adapters' rank, at least 1 (e.g. 8)")
    if args["lora"] and args["lora_alpha"] is None:
        # α = r: the update is B A as trained, the convention of diffusers' and kohya's SD LoRA recipes, whose
        # learning rates (~1e-4) then carry over; the paper instead fixes α while it varies r
        args["lora_alpha"] = float(args["lora"])
    if args["snr_gamma"] is not None and args["snr_gamma"] <= 0:
        p.error(f"--snr-gamma {args['snr_gamma']}: must be > 0 (e.g. 5), or left out for the plain MSE")
    if "lora_alpha" in given and not args["lora"]:  # else ignored: the weights themselves would train
        p.error(f"--lora-alpha {given['lora_alpha']:g}: scales LoRA's adapters; give --lora RANK too")
    if "ood_data" in given and not args["eval_every"]:  # else never opened: a typo in it would pass unsaid
        p.error(f"--ood-data {given['ood_data']}: measured at each validation, and --eval-every 0 has none")
    if args["lora_alpha"] is not None and args["lora_alpha"] <= 0:  # 0 would freeze the adapters' update at zero
        p.error(f"--lora-alpha {args['lora_alpha']}: scales the adapters' update by alpha / rank, must be > 0")
    if args["steps"] < 1:
        p.error(f"--steps {args['steps']}: optimizer steps in all, at least 1 (eval.py measures a run without training)")
    if args["save_every"] < 0:
        p.error(f"--save-every {args['save_every']}: steps between checkpoints, at least 0 (0: only at the end)")
    if args["eval_every"] < 0:
        p.error(f"--eval-every {args['eval_every']}: steps between validations, at least 0 (0: none)")
    if args["warmup"] < 0:
        p.error(f"--warmup {args['warmup']}: linear warm-up steps, at least 0")
    if not 0 <= args["ema"] < 1:  # from 1: the warm-up's decay alone, ever closer to 1; below 0: past the weights
        p.error(f"--ema {args['ema']}: the EMA's decay, from 0 (no EMA) up to but not including 1 (e.g. 0.9999)")
    for part in ("unet", "clip"):
        if args[f"lr_{part}"] <= 0:  # below 0 climbs the loss
            p.error(f"--lr-{part} {args[f'lr_{part}']}: a peak learning rate, must be > 0 (to freeze a part, "
                    "leave it out of --train)")
    for loss in ("itc", "is", "rsc"):
        if args[f"lambda_{loss}"] < 0:  # below 0 maximizes that loss
            p.error(f"--lambda-{loss} {args[f'lambda_{loss}']}: a loss weight, at least 0 (0 switches the loss off)")
    if not (args["lambda_itc"] or args["lambda_is"] or args["lambda_rsc"]):
        p.error("--lambda-itc, --lambda-is and --lambda-rsc are all 0: no loss is left to train")
    if not 1 <= args["rsc_t_max"] <= 1000:
        p.error(f"--rsc-t-max {args['rsc_t_max']}: RSC uses the timesteps below it, from 1 to 1000 (the schedule's "
                "timesteps; 1000: all)")
    if args["max_grad_norm"] < 0:  # below 0 would flip the gradient
        p.error(f"--max-grad-norm {args['max_grad_norm']}: the norm the gradient is clipped to, at least 0 (0: no "
                "clipping)")
    if args["workers"] is not None and args["workers"] < 0:
        p.error(f"--workers {args['workers']}: data loader processes per rank, at least 0 (0: load in the training "
                "process)")
    if args["vae_steps"] < 0:
        p.error(f"--vae-steps {args['vae_steps']}: steps fitting the tiny VAE, at least 0")
    if args["train_size"] is not None and args["train_size"] < 1:
        p.error(f"--train-size {args['train_size']}: the first N training items, at least 1 (default: all)")
    return argparse.Namespace(**args)


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
    d = init_distributed()
    run = Path(args.out)
    micro = micro_batch(args, d.world)
    parts = trained_parts(args)
    train_set, test_set, ood_set = open_data(args, d)
    ckpt = resume_from(args, run)
    model = build_model(args, ckpt, run, train_set, d)
    if args.lora:
        add_adapters(model, parts, args, ckpt)
    prepare_model(model, parts, args, d)
    opt, named = make_optimizer(model, args)
    params = [p for _, p in named]
    ema = [p.detach().float().clone() for p in params] if args.ema else None  # resuming: the checkpoint's EMA,
    step = load_checkpoint(ckpt, model, named, opt) if ckpt is not None else 0  # then its trained weights
    say(f"model: {args.model}, training {', '.join(parts)} ({sum(p.numel() for p in params) / 1e6:.1f}M parameters); "
        f"global batch {args.batch_size} = {d.world} rank(s) × {args.grad_accum} micro-step(s) × {micro}; {args.res} px; "
        f"{'bf16 autocast on ' + torch.cuda.get_device_name(d.device) if d.cuda else 'fp32 on CPU'}")
    if args.cache_latents:  # after prepare_model: the encoding runs on the device
        train_set = cache_latents(model, train_set, micro, args, run, d)
    net = wrap(model, args, d)
    batches = iter(make_loader(train_set, micro, step, args, d))

    with StopSignal(d.ddp) as stop:
        if step == 0 and args.eval_every:
            validate(model, params, ema, test_set, ood_set, step, run, args, d)
        progress = Progress(d.device)
        while step < args.steps:
            factor = lr_factor(step, args.warmup, args.steps)
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * factor
            losses = forward_backward(net, model, batches, step, args, d)
            skipped = optimizer_step(opt, params, ema, step, args)
            progress.add(losses, skipped)
            step += 1
            stopping = stop.agreed()
            at_eval = bool(args.eval_every) and (step % args.eval_every == 0 or step == args.steps)
            at_save = step == args.steps or bool(args.save_every) and step % args.save_every == 0
            if step % LOG_EVERY and not (at_eval or at_save or stopping):
                continue
            say(progress.sync(step, factor, run, args, d))  # raises if the loss or the gradients went bad
            if stopping:
                save(model, named, opt, ema, step, run, args, d)
                say(f"stopped at step {step}: continue with  {resume_command(d)} --resume {run}")
                return 128 + stopping  # the shell's convention: 130 for Ctrl-C, 143 for SIGTERM
            if at_eval:
                validate(model, params, ema, test_set, ood_set, step, run, args, d)
            if at_save:
                save(model, named, opt, ema, step, run, args, d)
            progress.t_line = time.time()  # validating and saving are not training time
    samples = f", samples in {run / 'samples'}/" if (run / "samples").is_dir() else ""  # none without validation
    say(f"done: {step} steps; checkpoints in {run}/{samples}")
    return 0


def resume_command(d):
    """How to launch this run again: python, or torchrun with this node's number of ranks."""
    return f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', d.world)} train.py" if d.ddp else \
        "python train.py"


def say(*a):
    """print, on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, flush=True)


# ------------------------------------------------------------------------------ setup

@dataclasses.dataclass(frozen=True)
class Dist:
    """This process's place: the only one, or one DDP rank of `world` (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)."""
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def master(self):  # rank 0 writes the run folder and validates
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.type == "cuda"

    def barrier(self):
        if self.ddp:
            dist.barrier()


def init_distributed():
    """DDP when torchrun started several processes; the device: this rank's GPU, else the CPU."""
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Dist(ddp, dist.get_rank() if ddp else 0, dist.get_world_size() if ddp else 1, device)


def micro_batch(args, world):
    """The samples of one rank's micro-step: --batch-size is split over the ranks and the --grad-accum micro-steps."""
    micro, rem = divmod(args.batch_size, world * args.grad_accum)
    if rem or micro < 1:
        raise RunError(f"--batch-size {args.batch_size} must be a positive multiple of ranks × --grad-accum "
                       f"= {world} × {args.grad_accum}")
    return micro


def trained_parts(args):
    """--train as a list, checked before anything is loaded."""
    parts = args.train.split(",")
    if set(parts) - {"unet", "text", "vision"}:
        raise RunError(f"--train {args.train!r}: choose from unet, text, vision (comma-separated)")
    return parts


def open_data(args, d):
    """(train split, test split, --ood-data's test split); the test splits None when there is no validation.
    What was skipped, converted, truncated at 77 tokens is said once."""
    sets = {"train": open_dataset(args.data, "train", args.res)}
    if args.train_size:
        sets["train"].keep_first(args.train_size)
    if args.eval_every:  # only validation reads the test rows
        sets["test"] = open_dataset(args.data, "test", args.res)
        if args.ood_data:
            sets["out of domain test"] = open_dataset(args.ood_data, "test", args.res)
    if d.master:  # counted, never silent
        seen = set()
        for split, ds in sets.items():
            for line in ds.report(Tokenizer().lengths):
                if line not in seen:
                    say(f"data ({split}): {line}")
                    seen.add(line)
    return sets["train"], sets.get("test"), sets.get("out of domain test")


def resume_from(args, run):
    """The checkpoint --resume continues (None: a new run), once sure the run folder holds nothing after it."""
    ckpt = latest_checkpoint(args.resume) if args.resume else None
    if ckpt is None and any(run.glob("step_*")):
        raise RunError(f"{run} already holds checkpoints: continue it with --resume {run}, or pick another --out")
    if ckpt is not None and ckpt.name != checkpoints(run)[-1].name:
        raise RunError(f"{run} holds checkpoints after {ckpt.name} (the latest is {checkpoints(run)[-1].name}): "
                       f"continuing from {ckpt.name} would mix two runs there; move the later ones out first")
    return ckpt


def build_model(args, ckpt, run, train_set, d):
    """The checkpoint's model, or a new run's start (recorded in run.json): the tiny model from --weights (the
    demo: the shipped pretrained one) or random with its VAE fitted first, or SD 1.5 + CLIP-L."""
    if ckpt is not None:
        say(f"resuming from {ckpt}")
        model = UniDiff.from_pretrained(ckpt)
    elif args.model == "tiny" and args.weights:
        model = UniDiff.from_pretrained(args.weights)
        start = {"model": "tiny", "weights": str(args.weights), "init": "init"}
    elif args.model == "tiny":
        # v-prediction: a UNet trained for minutes predicts ε poorly at high noise, and x̂0 = (z_t − √(1-ᾱ) ε̂) / √ᾱ
        # multiplies that error by up to 15 (t = 999); sampling starts there. v keeps x̂0's error bounded.
        model = UniDiff.tiny(seed=args.seed, v_prediction=True)
        check_size(model, *parse_res(args.res))  # before fitting its VAE at that size
        fit_vae(model.vae, train_set, args.vae_steps, args.seed, say)
        start = {"model": "tiny", "seed": args.seed, "init": "init"}
    else:
        if d.master:
            pretrained(args.weights)  # one rank downloads; the others wait, then read
        d.barrier()
        sd_path, clip_path = pretrained(args.weights)
        model = UniDiff.from_pretrained(sd_path, clip=clip_path)
        start = {"model": "sd15", "sd": str(sd_path.resolve()), "clip": str(clip_path.resolve())}
    check_size(model, *parse_res(args.res))
    if model.clip.vision_model is None and (args.lambda_itc or args.lambda_rsc):
        raise RunError("ITC and RSC need a CLIP with a vision tower; this model has a text encoder only")
    if ckpt is None and d.master:
        save_start(run, model, start, args)
    return model


def add_adapters(model, parts, args, ckpt):
    """--lora: adapters on the attention projections of the `parts` (lora.py), seeded. Resuming: the checkpoint's
    model folders hold the merged weights; the base weights and the adapters come from its lora files."""
    model.lora = attention_lora(model, parts, args.lora, args.lora_alpha, torch.Generator().manual_seed(args.seed))
    if ckpt is not None:
        was = read_state(ckpt)["args"]
        if (was.get("lora"), was.get("lora_alpha")) != (args.lora, args.lora_alpha):
            how = f"with --lora {was['lora']} --lora-alpha {was['lora_alpha']:g}" if was.get("lora") else "without --lora"
            raise RunError(f"{ckpt} was trained {how}: resume it without giving --lora or --lora-alpha again")
        load_lora(ckpt, model.lora)
    n_base = sum(a.target[0].weight.numel() for a in model.lora.values())
    say(f"LoRA: rank {args.lora}, alpha {args.lora_alpha:g}, on {len(model.lora)} attention projections of "
        f"{', '.join(parts)}: {sum(p.numel() for p in model.lora.parameters()):,} numbers train instead of their "
        f"{n_base:,}; the base weights are frozen")


def prepare_model(model, parts, args, d):
    """On the device, the `parts` trainable (with --lora: their adapters alone), the rest frozen."""
    model.to(d.device)
    if d.cuda:  # convolutions run fastest on NHWC tensors
        model.unet.to(memory_format=torch.channels_last)
        model.vae.to(memory_format=torch.channels_last)
    model.unet.grad_ckpt = model.clip.grad_ckpt = model.vae.grad_ckpt = bool(args.grad_ckpt)
    model.requires_grad_(False)
    if args.lora:
        model.lora.requires_grad_(True)
        return
    towers = {"unet": [model.unet], "text": [model.clip.text_model, model.clip.text_projection],
              "vision": [model.clip.vision_model, model.clip.visual_projection]}
    for part in parts:
        for m in towers[part]:
            m.requires_grad_(True)
    if {"text", "vision"} & set(parts):
        model.clip.logit_scale.requires_grad_(True)


def make_optimizer(model, args):
    """AdamW over the trainable parameters, and those as (name, parameter) in the optimizer's order. Per-part
    learning rates; no weight decay on biases, norms and the logit scale (1-d tensors)."""
    groups = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            part = "unet" if n.startswith(("unet.", "lora.lora_unet_")) else "clip"
            groups.setdefault((part, p.ndim >= 2), []).append((n, p))
    lrs = {"unet": args.lr_unet, "clip": args.lr_clip}
    opt = torch.optim.AdamW([{"params": [p for _, p in g], "base_lr": lrs[part], "lr": lrs[part],
                              "weight_decay": 1e-2 if decay else 0.0} for (part, decay), g in groups.items()],
                            betas=(0.9, 0.999), eps=1e-8, fused=True)  # fused: can skip a step on device (found_inf)
    return opt, [np_ for g in groups.values() for np_ in g]  # in group order: the optimizer numbers them so


def wrap(model, args, d):
    """What the steps call: the model compiled (each network in place, before DDP sees it), under DDP wrapped."""
    if args.compile:
        model.compile()
    if not d.ddp:
        return model
    # a λ of 0 leaves parts without gradient: DDP must then look for unused parameters
    return DDP(model, device_ids=[d.device.index] if d.cuda else None, broadcast_buffers=False,
               find_unused_parameters=not (args.lambda_itc and args.lambda_is and args.lambda_rsc))


def loader_workers(args, d):
    """--workers, by default 4 data loader processes per GPU rank and none on the CPU."""
    return args.workers if args.workers is not None else (4 if d.cuda else 0)


def make_loader(train_set, micro, step, args, d):
    """This rank's micro-batches from the data position of `step` on."""
    workers = loader_workers(args, d)
    return DataLoader(train_set, batch_sampler=Batches(len(train_set), micro, d.world, d.rank, args.seed,
                                                       step * args.batch_size),
                      num_workers=workers, pin_memory=d.cuda, persistent_workers=workers > 0,
                      worker_init_fn=ignore_signals)


# ------------------------------------------------------------------------------ one step

def forward_backward(net, model, batches, step, args, d):
    """The step's --grad-accum micro-steps, their gradients summed into .grad (averaged over the ranks at the
    last one). Returns the step's losses (itc, is_, rsc, total), the mean over its micro-steps, on the device."""
    micro_batches = []  # all of the step's first: gradient caching embeds them before the micro-steps
    for _ in range(args.grad_accum):
        images, captions = next(batches)  # pixels, or with --cache-latents Encoded
        images = images.to(d.device, non_blocking=True)
        if d.cuda and torch.is_tensor(images):  # the VAE's convolutions run fastest on NHWC pixels
            images = images.contiguous(memory_format=torch.channels_last)
        micro_batches.append((images, model.tokenizer(captions).to(d.device, non_blocking=True)))
    gens = [torch.Generator().manual_seed(step_seed(args.seed, step, a))  # on the host: see UniDiff.losses
            for a in range(args.grad_accum)]
    cache = None  # ITC and RSC contrast the whole step's batch, not a micro-batch: see losses.py
    if args.grad_accum > 1 and (args.lambda_itc or args.lambda_rsc):
        with autocast(d.device):
            cache = model.contrastive_cache(micro_batches, gens, args.lambda_itc, args.lambda_rsc, args.rsc_t_max)
    losses = torch.zeros(4, device=d.device)
    for a, (images, ids) in enumerate(micro_batches):
        with nullcontext() if not d.ddp or a == args.grad_accum - 1 else net.no_sync():  # all-reduce once
            with autocast(d.device):
                out = net(images, ids, generator=gens[a], cache=cache, micro_step=a, lambda_itc=args.lambda_itc,
                          lambda_is=args.lambda_is, lambda_rsc=args.lambda_rsc, t_max=args.rsc_t_max,
                          snr_gamma=args.snr_gamma, p_uncond=args.caption_dropout, rsc_one_way=args.rsc_one_way)
            (out["total"] / args.grad_accum).backward()
        losses += torch.stack([out[k].detach().float() for k in ("itc", "is_", "rsc", "total")]) / args.grad_accum
    return losses


def optimizer_step(opt, params, ema, step, args):
    """Clip, step AdamW, update the EMA. A non-finite gradient (the loss can still be finite) skips the step:
    AdamW's found_inf leaves weights and moments as they were, decided on the device (no host sync); the EMA
    waits too. Returns 1.0 when skipped, else 0.0 (a 0-dim tensor on the device)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if args.max_grad_norm:
        torch.nn.utils.clip_grads_with_norm_(params, args.max_grad_norm, norm)
    skipped = (~norm.isfinite()).float()
    opt.found_inf = skipped
    opt.step()
    opt.zero_grad(set_to_none=True)
    if ema is not None:  # warm-up (t = steps before this one): the initial weights fade out early
        w = (1 - min(args.ema, (1 + step) / (10 + step))) * (1 - skipped)
        torch._foreach_lerp_(ema, [p.detach().float() for p in params], [w] * len(ema))
    return skipped


class Progress:
    """The losses and skipped steps since the last progress line, summed on the device: reading them is a host
    sync, done only at a line (every LOG_EVERY steps, and before validating, saving or stopping)."""

    def __init__(self, device):
        self.sums = torch.zeros(4, device=device)  # itc, is, rsc, total summed over the steps since the last line
        self.skips = torch.zeros(2, device=device)  # steps skipped since the last line, and in a row until now
        self.n, self.t_line, self.t_run, self.steps_run = 0, time.time(), 0.0, 0

    def add(self, losses, skipped):
        self.sums += losses
        self.skips[0] += skipped
        self.skips[1] = (self.skips[1] + 1) * skipped
        self.n += 1

    def sync(self, step, factor, run, args, d):
        """The progress line up to `step`, the mean over ranks; stops the run when the loss is not finite or
        the last MAX_SKIPS steps were all skipped."""
        flags = torch.cat([self.sums, self.skips])
        if d.ddp:
            dist.all_reduce(flags)
        flags = (flags / d.world).tolist()
        n = self.n
        mean, skipped, in_a_row = [x / n for x in flags[:4]], round(flags[4]), round(flags[5])
        elapsed = time.time() - self.t_line
        self.t_run, self.steps_run = self.t_run + elapsed, self.steps_run + n
        if not all(map(math.isfinite, mean)):
            raise stopped(run, f"the loss is not finite between steps {step - n + 1} and {step} "
                               f"(itc {mean[0]:.4g}, is {mean[1]:.4g}, rsc {mean[2]:.4g})")
        if in_a_row >= MAX_SKIPS:
            raise stopped(run, f"the gradient was not finite at each of the last {in_a_row} steps (up to step "
                               f"{step}; skipped, so the weights are intact)")
        self.sums.zero_()
        self.skips[0] = 0
        self.n = 0
        return (f"step {step}/{args.steps} | loss {mean[3]:.4f} (itc {mean[0]:.4f} is {mean[1]:.4f} rsc {mean[2]:.4f}) | "
                f"lr ×{factor:.3f} | {n * args.batch_size / elapsed:.1f} img/s | "
                f"ETA {fmt_time((args.steps - step) * self.t_run / self.steps_run)}"
                + (f" | skipped {skipped} of {n} steps (non-finite gradient)" if skipped else ""))


def stopped(run, what):
    last = checkpoints(run)
    return RunError(f"{what}. Stopped without saving; "
                    + (f"the last good checkpoint is {last[-1]} (--resume {run})" if last else "there is no checkpoint yet")
                    + ". Try lower learning rates (--lr-unet/--lr-clip) or --max-grad-norm.")


class StopSignal:
    """Ctrl-C or SIGTERM (schedulers, torchrun) inside: finish the step, save, exit; a second one exits at once.
    The ranks agree after every step (torchrun kills them 30 s after forwarding the signal)."""

    def __init__(self, ddp):
        self.signum = 0  # the first signal's number, 0 until one comes
        self.group = dist.new_group(backend="gloo") if ddp else None  # the flag goes host to host: no GPU sync

    def __enter__(self):
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def on_signal(self, signum, _):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (a second Ctrl-C or SIGTERM "
            "quits without saving)")

    def agreed(self):
        """The signal to stop on after this step (0: none), the same on every rank, whichever rank got it."""
        signum = self.signum  # read once: a signal arriving from here on counts for the next step
        if self.group is not None:
            flag = torch.tensor([signum])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(flag)
        return signum


# ------------------------------------------------------------------------------ validation, checkpoints

def validate(model, params, ema, test_set, ood_set, step, run, args, d):
    """Test retrieval (and out of domain, with --ood-data) and a grid of samples from test captions: rows of
    real images, the start model's samples (drawn at step 0) and the current model's; the EMA weights if any."""
    if d.master:
        model.eval()
        with swap_in(params, ema), autocast(d.device):
            picks = distinct(test_set.captions, SAMPLE["n"])
            say(f"step {step} | validation: embedding {len(test_set)} test pairs, then sampling "
                f"{len(picks)} test captions ({SAMPLE['steps']} DDIM steps)")
            for name, ds in (("test", test_set), ("out of domain test", ood_set)):
                if ds is not None:
                    r = retrieval(*embed(model, ds), ds.captions)
                    say(f"step {step} | {name} retrieval, {len(ds)} pairs{' (EMA)' if ema else ''}: "
                        f"I→T R@1/5/10 {r['i2t_r1']:.1f}/{r['i2t_r5']:.1f}/{r['i2t_r10']:.1f} | "
                        f"T→I {r['t2i_r1']:.1f}/{r['t2i_r5']:.1f}/{r['t2i_r10']:.1f} | chance R@1 {r['chance_r1']:.1f} (%)")
            real = to_uint8(torch.stack([test_set[i][0] for i in picks]))
            W, H = parse_res(args.res)
            gen = model.generate([test_set.captions[i] for i in picks], steps=SAMPLE["steps"],
                                 guidance=SAMPLE["guidance"], seed=0, height=H, width=W)
        start = run / "samples" / "start.png"  # the start model's row: drawn once, before training
        if step == 0:
            save_grid([gen], start)
        rows = [real, load_row(start, len(picks)), gen] if step and start.is_file() else [real, gen]
        save_grid(rows, run / "samples" / f"step_{step:06d}.png")
        model.train()
    d.barrier()


def save(model, named, opt, ema, step, run, args, d):
    """A checkpoint (rank 0 writes it), unless the weights are not finite: then the run stops."""
    tensors = [p for _, p in named] + (ema or [])  # every rank checks (the same weights), so all stop together
    if not torch.stack([t.isfinite().all() for t in tensors]).all():
        raise stopped(run, f"the weights are not finite after step {step}")
    if d.master:
        state = {"step": step, "samples_seen": step * args.batch_size, "world": d.world, "args": vars(args),
                 "rng": "derived: a generator seeded by (seed, step, micro-step) each micro-step"}
        say(f"step {step} | saved {save_checkpoint(run, step, model, named, opt, ema, state)}")
    d.barrier()


def fit_vae(vae, dataset, steps, seed, say, batch=16, lr=3e-3):
    """Fit a random (tiny) VAE as an autoencoder: SD's VAE comes pretrained, and a random decoder
    would turn every latent, however well the UNet learns, into noise. Then, as SD did, set its
    scaling factor so the latents the UNet sees have unit variance. Deterministic in `seed`."""
    if not steps:
        return
    H, W = dataset[0][0].shape[-2:]
    t0, crop = time.time(), max(8, min(H, W) // 2)
    say(f"fitting the tiny VAE as an autoencoder: {steps} steps on {crop} px crops")
    t_said = t0
    vae.requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr, weight_decay=0)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = torch.stack([dataset[i][0] for i in torch.randint(0, len(dataset), (batch,), generator=g).tolist()])
        top, left = (int(torch.randint(0, n - crop + 1, (), generator=g)) for n in (H, W))
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


def cache_latents(model, train_set, micro, args, run, d):
    """--cache-latents: the training set read from its latent cache (latent_cache.py) in latent-cache/ beside the
    run folder, shared by the runs there. Without one for this data, resolution, VAE and precision, it is made
    first: each DDP rank encodes its share of the rows into one file, renamed into place when complete."""
    # autocast's precision (runs.autocast): the VAE's last layer and CLIP's first compute in it, so nothing is lost
    dtype = torch.bfloat16 if d.cuda else torch.float32
    folder, name, n = run.parent / "latent-cache", Path(args.data).name, len(train_set)
    path, captions = cache_file(folder, name, train_set, args.res, model.vae, dtype), train_set.captions
    if path.is_file():
        say(f"latent cache: {path} ({n} images; made for this data, resolution, VAE and precision)")
        return CachedSet(path, captions)
    (W, H), c, r = parse_res(args.res), model.vae.cfg.latent_channels, model.clip.cfg.vision.image_size
    latent = (n, c, H // model.down, W // model.down)
    shapes = {"mean": latent, "logvar": latent, "clip": (n, 3, r, r)}
    others = [p.name for p in folder.glob(f"{name}-*.safetensors")]
    say(f"latent cache: encoding the {n} training images once into {path} "
        f"({sum(map(math.prod, shapes.values())) * dtype.itemsize / 1e6:,.1f} MB)"
        + (f"; not reusing {', '.join(others)}: made for other data, resolution, VAE or precision" if others else ""))
    tmp = folder / f".{path.name}.{run.name}.tmp"
    if d.master:
        folder.mkdir(parents=True, exist_ok=True)
        create(tmp, shapes, dtype)
    d.barrier()
    _, where = layout(shapes, dtype)
    lo, hi = d.rank * n // d.world, (d.rank + 1) * n // d.world  # this rank's rows
    loader = DataLoader(Subset(train_set, range(lo, hi)), batch_size=micro, num_workers=loader_workers(args, d))
    t0 = t_said = time.time()
    row, replaced = lo, 0
    try:
        with open(tmp, "r+b") as f:
            for pixels, texts in loader:
                with autocast(d.device):
                    write_rows(f, where, row, model.encode(pixels.to(d.device)), dtype)
                # a folder's unreadable image comes back as the next one, with its caption: not row i's pair
                replaced += sum(text != captions[i] for i, text in enumerate(texts, row))
                row += len(texts)
                if time.time() - t_said >= PROGRESS_EVERY:
                    t_said = time.time()
                    say(f"latent cache: {row - lo}/{hi - lo} images encoded{' (rank 0, of its share)' if d.ddp else ''}"
                        f" ({t_said - t0:.0f}s)")
    except BaseException:  # Ctrl-C or an error: a half-written cache is as large as a whole one, and useless
        tmp.unlink(missing_ok=True)
        raise
    replaced = torch.tensor([replaced], device=d.device)
    if d.ddp:  # every rank learns whether any rank met an unreadable image, and that all have finished writing
        dist.all_reduce(replaced)
    replaced = int(replaced)
    if d.master and replaced:
        tmp.unlink()
    elif d.master:
        os.replace(tmp, path)
    d.barrier()
    if replaced:
        raise DataError(f"{replaced} training image(s) could not be read while caching (named above): remove them "
                        f"from {args.data} and run again")
    say(f"latent cache: {n} images encoded in {fmt_time(time.time() - t0)}, into {path}")
    return CachedSet(path, captions)


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
