"""A training run's settings: one dataclass, the presets as small dicts of overrides, the command line made from
the fields (its help shows each preset's value), and the range checks, one line each. For example
parse_args(["--data", "demo", "--steps", "50"]) is Config(data='demo', model='tiny', steps=50, ...)."""
import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from data import TEST_FRACTION, parse_res, res_name
from runs import latest_checkpoint, read_state, summary_writer

FASHION_DATA = ("fashion_woman", "fashion_man", "ecommerce_product")  # portrait photos: see FASHION below


def opt(default, help, **argparse_kw):
    """A field: its default, and its --help line ('{default}' there becomes the defaults of every preset)."""
    return field(default=default, metadata=dict(help=help, **argparse_kw))


@dataclass
class Config:
    """Defaults of a real fine-tune: SD 1.5 + CLIP ViT-L/14 at 512 px on a GPU."""
    data: str = opt(None, "a preset (fashion_woman, fashion_man, ecommerce_product, world, demo) or a folder; a "
                    f"folder's test\nsplit is its metadata's split column, else a seeded {TEST_FRACTION:.0%}% of its "
                    "groups (see data.py)")
    model: str = opt("sd15", "sd15: SD 1.5 + CLIP ViT-L/14; tiny: CPU-sized, with its own defaults\n({default}; "
                     "--data demo implies tiny)", choices=["sd15", "tiny"])
    weights: str = opt(None, "sd15: folder of the pretrained weights, a diffusers pipeline folder, a run folder (its "
                       "newest\ncheckpoint), or an SD 1.x single-file .safetensors (default: $UNIDIFF_WEIGHTS, else "
                       "weights/);\ntiny: a saved UniDiff folder to start from "
                       "(default: random weights,\nthe VAE fitted first; demo: this repo's assets/unidiff-tiny, the "
                       "shipped pretrained tiny model)")
    steps: int = opt(2000, "optimizer steps in all ({default})")
    # global, so one GPU and eight give the same run
    batch_size: int = opt(16, "global batch per optimizer step, over all ranks and micro-steps ({default})")
    out: str = opt(None, "the run folder (default runs/<data>)")
    save_every: int = opt(500, "steps between checkpoints ({default}; 0: only at the end)")
    eval_every: int = opt(250, "steps between validations: test retrieval + a sample grid ({default}; 0: none)")
    # the viewer kohya's and diffusers' users know; optional, as log.jsonl holds the same numbers without a package
    tensorboard: bool = opt(False, "also log log.jsonl's numbers and the validation grids for TensorBoard, in "
                            "<run>/tensorboard\n(needs the tensorboard package; to view: tensorboard --logdir "
                            "runs/NAME/tensorboard)")
    seed: int = opt(0, "seed of the data order, noise and (tiny) the initial weights ({default})")
    lambda_itc: float = opt(1.0, "weight of the image-text contrastive loss ({default})")
    lambda_is: float = opt(1.0, "weight of the image-synthesis (diffusion) loss ({default})")
    # off: in no form we tried did RSC keep more of what the model knew (docs/results.md, the forgetting study)
    lambda_rsc: float = opt(0.0, "weight of the reciprocal semantic consistency loss ({default}; e.g. 0.1)")
    # at high noise the one-step estimate of the image is a blur, with little for CLIP to read
    rsc_t_max: int = opt(500, "RSC uses the samples with timestep t < this ({default})")
    snr_gamma: float = opt(None, "min-SNR-γ weighting of the diffusion loss, e.g. 5 (default: none, the plain MSE)")
    # classifier-free guidance needs the empty caption trained
    caption_dropout: float = opt(0.1, "probability of training a sample on the empty caption ({default})")
    rsc_form: str = opt("kl", "RSC's form ({default}; the README's losses): kl, kl-one-way (only the generated image "
                        "learns), feature,\nrelational, anchored (kept near the start CLIP)",
                        choices=["kl", "kl-one-way", "feature", "relational", "anchored"])
    is_detach_text: bool = opt(False, "the diffusion loss trains the UNet alone: no gradient into the shared text "
                               "tower")
    # the forgetting study's choice: the best balance of learning the domain and keeping the rest (docs/results.md)
    l2sp: float = opt(1.0, "L2-SP: λ‖θ − θ₀‖² pulls the trained weights towards the start's ({default}; 0: off)")
    # CLIP forgets what it knew faster than the UNet: a tenth of its learning rate
    lr_unet: float = opt(1e-5, "peak learning rate of the UNet ({default})")
    lr_clip: float = opt(1e-6, "peak learning rate of CLIP, both towers ({default})")
    train: str = opt("unet,text,vision", "the parts that train, comma-separated from unet,text,vision ({default})")
    grad_accum: int = opt(1, "micro-steps per optimizer step ({default}): less memory, the same global batch; ITC and "
                          "RSC\nstill contrast all of it (gradient caching: one more no-grad CLIP forward per step). "
                          "Left out: RSC's\ngradient into a caption from the other micro-steps' RSC rows (docs/training.md)")
    grad_ckpt: bool = opt(False, "gradient checkpointing: recompute activations in backward (less memory, ~30%% "
                          "slower)")
    # EMA weights lag the live ones by ~1/(1-decay) steps: worth it only in long runs
    ema: float = opt(0.0, "EMA decay of the trained weights, e.g. 0.9999 ({default}: no EMA)")
    # WiSE-FT (Wortsman et al. 2022): a fine-tune averaged with its start keeps more of what the start knew
    wise_ft: float = opt(1.0, "checkpoints and validation hold (1 − α) θ₀ + α θ, the start's and the trained weights "
                         "(WiSE-FT;\n{default}: the trained ones); training goes on from θ (in live.safetensors)")
    # AdamW's second moments are estimated from a few steps at first: small steps until they settle
    warmup: int = opt(100, "linear warm-up steps before the cosine decay ({default})")
    compile: bool = opt(False, "torch.compile each network (UniDiff.compile); minutes of compiling first")
    workers: int = opt(None, "data loader processes per rank (default 4 on GPU, 0 on CPU)")
    res: str = opt(512, "training resolution: WIDTHxHEIGHT in pixels, or one number for a square ({default});\n"
                   f"fashion: the portrait presets {', '.join(FASHION_DATA)}. Sides in multiples of 64 (tiny: 4)")
    # one odd batch cannot throw the weights far
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this ({default}; 0: no clipping)")
    # a random decoder turns any latent into noise: the tiny VAE is fitted before the run
    vae_steps: int = opt(200, "tiny only: steps fitting its random VAE as an autoencoder first ({default})")
    ood_data: str = opt(None, "validation also reports retrieval on this data's test split: what fine-tuning "
                        "forgets\nout of its domain (default none; demo world)")
    lora: int = opt(None, "train low-rank adapters of this rank (e.g. 8) on the --lora-targets layers of the --train "
                    "parts,\ntheir weights frozen (lora.py; default none: the weights themselves train)")
    lora_alpha: float = opt(None, "the adapters' update is scaled by alpha / rank (default: the rank, a scale of 1)")
    # attention by default: the set every run before this flag trained (a resume keeps its own), and the one the docs'
    # LoRA measurements used; kohya adapts ~2.2x the numbers at equal rank (lora.py: TARGETS)
    lora_targets: str = opt("attention", "the layers that get adapters: attention (q/k/v/out, as diffusers' LoRA "
                            "scripts; {default}) or kohya\n(sd-scripts' default: also the UNet transformers' "
                            "proj_in/out and feed-forward, and CLIP's MLP;\nmore weights, the files as kohya's)",
                            choices=["attention", "kohya"])
    cache_latents: bool = opt(False, "encode the training images once with the frozen VAE (and CLIP's view of them) "
                              "into\nlatent-cache/ beside the run folder, which later runs and --resume reuse: the "
                              "steps skip the VAE encoder\n(docs/training.md)")
    # a launch's choice, as the number of ranks is: a resume shards only when given it again
    fsdp: bool = opt(False, "under torchrun: shard the weights, gradients and AdamW's state over the ranks (FSDP2) "
                     "instead of\na whole copy on each (DDP): for a model whose training state does not fit one GPU "
                     "(docs/training.md)")
    train_size: int = opt(None, "train on the first N items of the training split (default: all of them)")
    resume: str = opt(None, "continue the run in this folder from its latest checkpoint (flags given again override)")

    def losses_kw(self):
        """What UniDiff.losses takes from the settings."""
        return dict(lambda_itc=self.lambda_itc, lambda_is=self.lambda_is, lambda_rsc=self.lambda_rsc,
                    t_max=self.rsc_t_max, snr_gamma=self.snr_gamma, p_uncond=self.caption_dropout,
                    rsc_form=self.rsc_form, is_detach_text=self.is_detach_text)


DEFAULTS = {f.name: f.default for f in fields(Config) if f.name != "resume"}
# The tiny model on any data: random init (high learning rates) and CPU-sized (32 px, a few minutes).
# No L2-SP: random initial weights hold nothing worth keeping.
TINY = dict(steps=300, batch_size=32, res=32, lr_unet=2e-3, lr_clip=1e-3, save_every=100, eval_every=50, warmup=20,
            l2sp=0.0)
PRETRAINED_TINY = Path(__file__).resolve().parent / "assets" / "unidiff-tiny"  # made as docs/results.md says
# The demo fine-tunes the shipped pretrained tiny model on its narrow domain and measures what it forgets of the
# broad world it was pretrained on. It keeps the tiny learning rates: of three pairs, the best in-domain
# validation R@1 (docs/results.md).
DEMO = dict(weights=str(PRETRAINED_TINY), steps=200, ood_data="world", l2sp=1.0)
# The fashion presets are portrait photos (750x1101, 1080x1440): a square crop cuts off heads or shoes.
FASHION = dict(res="512x768")  # SD 1.5's 512 wide, 2:3


def defaults(model, data):
    """The defaults of a run of `model` on `data`: the fashion presets', the tiny model's, the demo's on top."""
    tiny = TINY if model == "tiny" else {}
    fashion = FASHION if data in FASHION_DATA else {}
    return {**DEFAULTS, **fashion, **tiny, **(DEMO if tiny and data == "demo" else {}), "model": model}


def default_text(key):
    """e.g. 'default 2000; tiny 300; demo 200': the help says what the code does."""
    show = lambda v: f"{v:g}" if isinstance(v, float) else str(v)
    named = (("fashion", FASHION), ("tiny", TINY), ("demo", DEMO))
    return f"default {show(DEFAULTS[key])}" + "".join(f"; {name} {show(d[key])}" for name, d in named if key in d)


def parser():
    """The command line, one flag per field."""
    p = argparse.ArgumentParser(description="Fine-tune CLIP and Stable Diffusion together with ITC + IS + RSC.",
                                formatter_class=argparse.RawTextHelpFormatter)
    for f in fields(Config):
        kw = dict(f.metadata)
        if "{default}" in kw["help"]:  # only fields with a default to show: default_text needs one
            kw["help"] = kw["help"].replace("{default}", default_text(f.name))
        if f.type is bool:
            kw.update(action="store_const", const=True)
        elif f.type is not str:
            kw["type"] = f.type
        p.add_argument("--" + f.name.replace("_", "-"), default=None, **kw)
    return p


# (field, valid, what it is): values that would crash with a traceback or run silently wrong
RANGES = [
    ("caption_dropout", lambda v: 0 <= v <= 1, "a probability, from 0 to 1"),
    ("grad_accum", lambda v: v >= 1, "micro-steps per optimizer step, at least 1"),
    ("lora", lambda v: v >= 1, "the adapters' rank, at least 1 (e.g. 8)"),
    ("snr_gamma", lambda v: v > 0, "must be > 0 (e.g. 5), or left out for the plain MSE"),
    ("lora_alpha", lambda v: v > 0, "scales the adapters' update by alpha / rank, must be > 0"),  # 0 freezes them
    ("steps", lambda v: v >= 1, "optimizer steps in all, at least 1 (eval.py measures a run without training)"),
    ("save_every", lambda v: v >= 0, "steps between checkpoints, at least 0 (0: only at the end)"),
    ("eval_every", lambda v: v >= 0, "steps between validations, at least 0 (0: none)"),
    ("warmup", lambda v: v >= 0, "linear warm-up steps, at least 0"),
    # from 1: the warm-up's decay alone, ever closer to 1; below 0: past the weights
    ("ema", lambda v: 0 <= v < 1, "the EMA's decay, from 0 (no EMA) up to but not including 1 (e.g. 0.9999)"),
    *[(f"lr_{part}", lambda v: v > 0, "a peak learning rate, must be > 0 (to freeze a part, leave it out of --train)")
      for part in ("unet", "clip")],  # below 0 climbs the loss
    *[(f"lambda_{loss}", lambda v: v >= 0, "a loss weight, at least 0 (0 switches the loss off)")
      for loss in ("itc", "is", "rsc")],  # below 0 maximizes the loss
    ("rsc_t_max", lambda v: 1 <= v <= 1000, "RSC uses the timesteps below it, from 1 to 1000 (the schedule's "
                                            "timesteps; 1000: all)"),
    ("l2sp", lambda v: v >= 0, "the L2-SP weight, at least 0 (0: off)"),  # below 0 pushes away from the start
    ("wise_ft", lambda v: 0 <= v <= 1, "WiSE-FT's α, from 0 (the start's weights) to 1 (the trained ones)"),
    ("max_grad_norm", lambda v: v >= 0, "the norm the gradient is clipped to, at least 0 (0: no clipping)"),
    ("workers", lambda v: v >= 0, "data loader processes per rank, at least 0 (0: load in the training process)"),
    ("vae_steps", lambda v: v >= 0, "steps fitting the tiny VAE, at least 0"),
    ("train_size", lambda v: v >= 1, "the first N training items, at least 1 (default: all)"),
]


def parse_args(argv=None):
    """The run's Config: the preset's defaults, then the flags given; with --resume the run's own settings first."""
    p = parser()
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    if "resume" in given:  # the run's own arguments, then whatever was given again
        ckpt = latest_checkpoint(given["resume"])
        if "out" in given and Path(given["out"]).resolve() != ckpt.parent.resolve():  # else ignored unsaid
            p.error(f"--out {given['out']}: a resumed run goes on in its own folder, {ckpt.parent}; to branch it, "
                    "copy that folder and --resume the copy")
        state = read_state(ckpt)
        state["args"].pop("fsdp", None)
        if state["args"].pop("rsc_one_way", False):  # the flag --rsc-form kl-one-way replaced
            state["args"]["rsc_form"] = "kl-one-way"
        was = state["args"].get("lora_targets", "attention")  # saved before the flag: attention
        if state["args"].get("lora") and given.get("lora_targets", was) != was:  # the adapters in its files are those
            p.error(f"--lora-targets {given['lora_targets']}: {ckpt} was trained with --lora-targets {was}; resume it "
                    "without giving it again")
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
    if args.get("lora") and "l2sp" not in given:  # LoRA keeps the base weights itself: L2-SP's default steps aside
        args["l2sp"] = 0.0
    cfg = Config(**args)
    check(cfg, given, p.error)
    return cfg


def check(cfg, given, error):
    """Each out-of-range value, and each flag that would be ignored unsaid, stops with one line."""
    for name, valid, what in RANGES:
        value = getattr(cfg, name)
        if value is not None and not valid(value):
            error(f"--{name.replace('_', '-')} {value}: {what}")
    if cfg.lora and cfg.lora_alpha is None:
        # α = r: the update is B A as trained, as in diffusers' SD LoRA script (kohya's sd-scripts default to
        # --network_alpha 1, a scale of 1/r); the paper instead fixes α while it varies r
        cfg.lora_alpha = float(cfg.lora)
    if "lora_targets" in given and not cfg.lora:  # else ignored: the weights themselves would train
        error(f"--lora-targets {given['lora_targets']}: chooses LoRA's layers; give --lora RANK too")
    if "lora_alpha" in given and not cfg.lora:  # else ignored: the weights themselves would train
        error(f"--lora-alpha {given['lora_alpha']:g}: scales LoRA's adapters; give --lora RANK too")
    if "ood_data" in given and not cfg.eval_every:  # else never opened: a typo in it would pass unsaid
        error(f"--ood-data {given['ood_data']}: measured at each validation, and --eval-every 0 has none")
    if cfg.wise_ft < 1 and (cfg.ema or cfg.lora):  # the checkpoint has room for one set of weights besides the live
        error("--wise-ft with --ema or --lora: choose one way of averaging the weights")
    if cfg.l2sp and cfg.lora:  # the adapters have no start weights to be pulled towards
        error("--l2sp with --lora: LoRA already keeps the base weights; use one or the other")
    if "tensorboard" in given and summary_writer() is None:  # inherited through --resume, the run warns instead
        error("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    if cfg.fsdp:
        check_fsdp(cfg, error)
    if not (cfg.lambda_itc or cfg.lambda_is or cfg.lambda_rsc):
        error("--lambda-itc, --lambda-is and --lambda-rsc are all 0: no loss is left to train")


def check_fsdp(cfg, error):
    """--fsdp's refusals: what cannot run sharded."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:  # one process: nothing to shard over
        error("--fsdp shards over the ranks of torchrun --nproc_per_node=N, N ≥ 2; this is one process")
    if cfg.lora:  # merging the adapters into sharded weights is not written; the adapters alone are small anyway
        error("--fsdp with --lora: LoRA trains a few MB, which DDP holds whole on each rank; drop --fsdp")
    if cfg.compile:  # UniDiff.compile compiles whole networks, across the blocks' FSDP hooks
        error("--fsdp with --compile: the networks compile whole, across FSDP's per-block gathers; drop one")
    if cfg.lambda_rsc and cfg.rsc_form == "anchored":  # a whole frozen copy per rank, what FSDP is there to avoid
        error("--fsdp with --rsc-form anchored: it reads a whole frozen start CLIP on each rank; use DDP or another form")
