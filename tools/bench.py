"""Speed and memory, ours against the reference libraries, side by side in one process.

    python -m tools.bench            # SD 1.5 UNet + VAE, CLIP ViT-L/14, batch 8, 512 px, bf16, one GPU
    python -m tools.bench --tiny     # tiny configs on the CPU: a smoke test of this script
    python -m tools.bench --flops    # model FLOPs per image of each step, from pixels and from cached latents
    python -m tools.bench --memory   # the memory of train.py's step: full vs LoRA, cached latents, grad ckpt

Same configs (the references are built from our configs' public-format JSON), same random
weights, batch, inputs and precision (bf16 autocast, fp32 master weights, fused AdamW on
CUDA). Each reference runs as shipped and tuned (torch.compile + channels-last); the ratio
that counts is against the faster. MFU = counted model FLOPs (torch.utils.flop_counter) /
time / the bf16 matmul rate measured in the same run. `transformers` and `diffusers` are
imported here only as the yardstick. The memory table runs first, train.py's own step with each row in a
process of its own (`--memory`: that table alone, also on a CPU).
"""
import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import clip as clip_mod
import unet as unet_mod
import vae as vae_mod
from losses import itc_loss
from unidiff import Encoded, UniDiff, ddim_sample

SCALE = 0.18215
REPO = Path(__file__).resolve().parents[1]


def random_model(tiny):
    """SD 1.5 (UNet + VAE) and CLIP ViT-L/14 with random weights, or the tiny model; on torch's default device."""
    if tiny:
        return UniDiff.tiny()
    return UniDiff(clip_mod.CLIP(clip_mod.PRESETS["vit-l/14"]), unet_mod.UNet(unet_mod.PRESETS["sd15"]),
                   vae_mod.VAE(vae_mod.PRESETS["sd"]))


# ---- timing ----------------------------------------------------------------------------

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, warmup, iters):
    """Median seconds per call after `warmup` calls (compilation happens there); the process's peak memory,
    and the step's own: that peak less what was allocated before the first call (weights resident)."""
    gc.collect()  # the previous row's optimizer state must be gone before `before` is read
    before = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    for _ in range(warmup):
        fn()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else float("nan")
    return sorted(times)[len(times) // 2], peak / 2**30, (peak - before) / 2**30


def count_flops(fn):
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def step_flops(tiny=False, batch=8, res=512):
    """Model FLOPs per image of each training step, from pixels and from cached latents (train.py --cache-latents),
    counted on the meta device (shapes only: no memory, no time); SD 1.5 + CLIP ViT-L/14, or the tiny model.
    -> ({step: (from pixels, cached)}, {frozen VAE pass: forward FLOPs})."""
    with torch.device("meta"):
        m = random_model(tiny)
    ids = m.tokenizer([f"a photo of garment number {i}" for i in range(batch)]).to("meta")
    pixels = torch.empty(batch, 3, res, res, device="meta")
    per_image = lambda fn: count_flops(fn) / batch

    def step(images, parts, **weights):
        m.requires_grad_(False)
        for part in parts:
            part.requires_grad_(True)
        return per_image(lambda: m.losses(images, ids, **weights)["total"].backward())

    steps = {"SD step (UNet trained)": ((m.unet,), dict(lambda_itc=0, lambda_rsc=0)),
             "CLIP ITC step (both towers trained)": ((m.clip,), dict(lambda_is=0, lambda_rsc=0)),
             "UniDiff step, no RSC rows": ((m.unet, m.clip), dict(t_max=0)),
             "UniDiff step, every row in RSC": ((m.unet, m.clip), dict(t_max=1000))}
    rows = {name: (step(pixels, parts, **w), step(m.encode(pixels), parts, **w)) for name, (parts, w) in steps.items()}
    r = m.clip.cfg.vision.image_size
    vae = {"encode": per_image(lambda: m.vae.encode(pixels)),
           f"RSC's decode at {r} px": per_image(lambda: m.vae.decode(torch.empty(batch, 4, r // m.down, r // m.down,
                                                                                  device="meta"))),
           f"decode at {res} px": per_image(lambda: m.vae.decode(torch.empty(batch, 4, res // m.down, res // m.down,
                                                                              device="meta")))}
    return rows, vae


def print_flops(tiny, batch, res):
    rows, vae = step_flops(tiny, batch, res)
    print(f"Model FLOPs per image ({'tiny model' if tiny else 'SD 1.5 + CLIP ViT-L/14'}, {res} px, batch {batch}; "
          "torch.utils.flop_counter on the meta device)\n")
    print("| step | from pixels | from cached latents (--cache-latents) |\n|---|---|---|")
    flop = lambda f: f"{f / 1e12:.2f} TFLOP" if f >= 1e11 else f"{f / 1e9:.2f} GFLOP"
    for name, (px, cached) in rows.items():
        print(f"| {name} | {flop(px)} | {flop(cached)}{f' ({cached / px - 1:+.0%})' if cached != px else ''} |")
    print("\nThe frozen VAE, forward: " + ", ".join(f"{k} {flop(v)}" for k, v in vae.items()))


def matmul_peak(dev):
    """Measured bf16 matmul rate (FLOP/s): the MFU denominator."""
    if dev.type != "cuda":
        return float("nan")
    n = 8192
    a, b = (torch.randn(n, n, device=dev, dtype=torch.bfloat16) for _ in range(2))
    sec = timed(lambda: a @ b, dev, 3, 20)[0]
    return 2 * n**3 / sec


def free():
    """Drop the finished case's optimizer and activations before the next one is measured."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- memory: train.py's own step ------------------------------------------------------------------

MEMORY_BATCH = 4  # on a GPU; on the CPU 1 at 256 px, where a full-size step takes seconds
# The memory table's rows: (--lora rank, --cache-latents, --grad-ckpt), every part trained (train.py's default)
MEMORY_ROWS = [(lora, cache, ckpt) for lora in (None, 16) for cache in (False, True) for ckpt in (False, True)]


def memory_table(tiny, batch, res):
    """Each row of MEMORY_ROWS measured in a fresh process (on the CPU a process's peak cannot be reset) ->
    [dict(lora, cache, ckpt, trained, state_gb, start_gb, peak_gb, sec) or dict(..., failed=why)]."""
    import subprocess
    print_memory_header(tiny, batch, res, torch.cuda.is_available())
    rows = []
    for lora, cache, ckpt in MEMORY_ROWS:
        cfg = dict(tiny=tiny, batch=batch, res=res, lora=lora, cache=cache, ckpt=ckpt)
        out = subprocess.run([sys.executable, "-m", "tools.bench", "--memory-row", json.dumps(cfg)], cwd=REPO,
                             capture_output=True, text=True)
        if out.returncode == 0:
            row = json.loads(out.stdout.splitlines()[-1])
        else:  # -9: the kernel's out-of-memory killer
            row = {**cfg, "failed": f"exit {out.returncode}: {(out.stderr.strip().splitlines() or ['killed'])[-1]}"}
        print(memory_line(row), flush=True)
        rows.append(row)
    return rows


def memory_row(tiny, batch, res, lora, cache, ckpt):
    """Two steps of train.py's step (forward_backward, optimizer_step: AdamW's moments exist from the first on)
    for a random model, every row of the batch in RSC (the most memory any step can take) -> the peak: on CUDA
    the peak allocated, on the CPU the process's peak resident set (less its size before the model was built)."""
    import resource
    from itertools import repeat
    import train
    from parallel import init_distributed
    if os.path.exists("/proc/self/oom_score_adj"):  # Linux: if the machine runs out, the kernel ends this process
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    from config import Config, defaults
    cfg = Config(**{**defaults("tiny" if tiny else "sd15", None), "batch_size": batch, "lora": lora,
                    "lora_alpha": lora and float(lora), "cache_latents": cache, "grad_ckpt": ckpt,
                    "lambda_rsc": 0.1, "rsc_t_max": 1000})  # every row through RSC: the most memory a step takes
    d = init_distributed()
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 2**30
    start = 0.0 if d.cuda else rss()
    torch.manual_seed(0)
    with torch.device(d.device):
        model = random_model(tiny)
    parts = train.trained_parts(cfg.train)
    if lora:
        train.add_adapters(model, parts, cfg.lora, cfg.lora_alpha, cfg.seed, None, cfg.lora_targets)
    train.prepare_model(model, parts, cfg.lora, cfg.grad_ckpt, d)
    opt, named = train.make_optimizer(model, cfg.lr_unet, cfg.lr_clip)
    params = [p for _, p in named]
    trained = sum(p.numel() for p in params)
    # fp32 weights (all), gradients and AdamW's two moments (the trained ones): the memory any step holds
    state = (sum(p.numel() for p in model.parameters()) + 3 * trained) * 4 / 2**30
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(batch, 3, res, res, generator=g) * 2 - 1
    if cache:  # what the latent cache holds (its contents do not change the memory)
        h, r = res // model.down, model.clip.cfg.vision.image_size
        dtype = torch.bfloat16 if d.cuda else torch.float32  # as latent_cache stores it
        pixels = Encoded(*(torch.randn(s, generator=g).to(dtype) for s in ((batch, 4, h, h), (batch, 4, h, h),
                                                                          (batch, 3, r, r))))
    batches = repeat((pixels, [f"a photo of garment number {i}" for i in range(batch)]))
    for step in range(2):
        t0 = time.perf_counter()
        gens = [torch.Generator().manual_seed(train.step_seed(cfg.seed, step, 0))]
        train.forward_backward(model, model, batches, gens, cfg.losses_kw(), d)
        train.optimizer_step(opt, params, None, step, cfg.max_grad_norm, cfg.ema)
        sync(d.device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if d.cuda else rss()
    return dict(tiny=tiny, batch=batch, res=res, lora=lora, cache=cache, ckpt=ckpt, trained=trained,
                state_gb=state, start_gb=start, peak_gb=peak - start, sec=time.perf_counter() - t0)


def memory_label(row):
    flags = [f"--lora {row['lora']}" if row["lora"] else "full fine-tune"]
    return " ".join(flags + [f for f, on in (("--cache-latents", row["cache"]), ("--grad-ckpt", row["ckpt"])) if on])


def memory_line(row):
    """One Markdown row: the training, trained numbers, state by arithmetic, measured peak, what is above the state."""
    if "failed" in row:
        return f"| {memory_label(row)} | | | {row['failed']} | | |"
    return (f"| {memory_label(row)} | {row['trained'] / 1e6:,.1f} M | {row['state_gb']:.2f} | {row['peak_gb']:.2f} | "
            f"{row['peak_gb'] - row['state_gb']:.2f} | {row['sec']:.1f} |")


def print_memory_header(tiny, batch, res, cuda):
    where = ("peak allocated on " + torch.cuda.get_device_name()) if cuda else \
        "peak resident set on the CPU (fp32), less the process's size before the model was built"
    print(f"\nMemory of one train.py step, {'tiny model' if tiny else 'SD 1.5 + CLIP ViT-L/14'}, random weights, "
          f"batch {batch}, {res} px, every part trained, every row in RSC: {where}. State: fp32 weights + gradients "
          "+ AdamW moments, by arithmetic.\n")
    print("| training | trained | state GiB | peak GiB | peak − state GiB | s/step |\n|---|---|---|---|---|---|")


# ---- the steps ---------------------------------------------------------------------------

def optimizer(params, dev):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-5,
                             fused=dev.type == "cuda")


def reference_sd_step(unet, vae, text, x, ids, ac, dev, amp):
    """The diffusers training step (as in diffusers' train_text_to_image.py)."""
    opt = optimizer(unet.parameters(), dev)

    def step():
        with amp:
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample() * SCALE
                ctx = text(ids)[0]
            t = torch.randint(0, 1000, (x.shape[0],), device=dev)
            noise = torch.randn_like(z)
            a = ac[t].view(-1, 1, 1, 1)
            pred = unet(a.sqrt() * z + (1 - a).sqrt() * noise, t, ctx).sample
        F.mse_loss(pred.float(), noise.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference_clip_step(model, pixels, ids, dev, amp, compiled):
    opt = optimizer(model.parameters(), dev)
    image_features, text_features = model.get_image_features, model.get_text_features
    if compiled:  # these methods, not forward(), are what a CLIP fine-tune calls
        image_features, text_features = torch.compile(image_features), torch.compile(text_features)

    def step():
        with amp:
            img = image_features(pixel_values=pixels)
            txt = text_features(input_ids=ids)
            img, txt = (o if torch.is_tensor(o) else o.pooler_output for o in (img, txt))
            loss = itc_loss(img.float(), txt.float(), model.logit_scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def our_step(model, x, ids, dev, amp, **weights):
    """What train.py runs (with --compile, after `model.compile()`)."""
    opt = optimizer(model.parameters(), dev)

    def step():
        with amp:
            loss = model(x, ids, **weights)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference_sampler(unet, vae, ctx, uncond, latents, steps, guidance):
    from diffusers import DDIMScheduler
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          clip_sample=False, set_alpha_to_one=False, steps_offset=1)

    @torch.no_grad()
    def sample():
        sched.set_timesteps(steps)
        z = latents
        for t in sched.timesteps:
            e_u, e_c = unet(torch.cat([z, z]), t, torch.cat([uncond, ctx])).sample.chunk(2)
            z = sched.step(e_u + guidance * (e_c - e_u), t, z).prev_sample
        return vae.decode(z / SCALE).sample
    return sample


def our_sampler(model, ctx, uncond, latents, steps, guidance):
    @torch.no_grad()
    def sample():
        z = ddim_sample(model.unet, latents, ctx, uncond, model.alphas_cumprod, steps, guidance)
        return model.vae.decode(z / SCALE)
    return sample


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU (smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, help="square images (default 512; the CPU's memory table: 256)")
    p.add_argument("--iters", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--sample-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps when sampling")
    p.add_argument("--cases", default="sd,clip,unidiff,sample,memory")
    p.add_argument("--compile", choices=["all", "refs", "none"], default="all",
                   help="which rows get a torch.compile variant (refs: the references' tuned rows only)")
    p.add_argument("--json", help="write the rows here (after each row, so a cut-off run keeps them)")
    p.add_argument("--flops", action="store_true", help="count the model FLOPs of each step (no timing, any machine)")
    p.add_argument("--memory", action="store_true",
                   help="only the memory table (any machine; on the CPU batch 1 at 256 px, tiny: 2 at 32 px)")
    p.add_argument("--memory-row", help=argparse.SUPPRESS)  # one row of it, in a process of its own
    args = p.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(p.get_default("cases").split(","))
    if unknown:
        p.error(f"--cases {args.cases}: unknown {', '.join(sorted(unknown))}; choose from {p.get_default('cases')}")
    for flag, what in (("batch", "images per training step"), ("iters", "timed steps per row"),
                       ("sample_batch", "images per sampler call"), ("steps", "DDIM steps when sampling")):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: {what}, at least 1")
    if args.res is not None and args.res < 1:
        p.error(f"--res {args.res}: the images' side in pixels, at least 1")
    if args.flops or not args.memory:
        args.res = args.res or 512
    return args


def main():
    args = parse_args()
    if args.flops:
        return print_flops(args.tiny, args.batch if not args.tiny else 2, args.res if not args.tiny else 32)
    if args.memory_row:
        return print(json.dumps(memory_row(**json.loads(args.memory_row))))
    if args.memory:
        return memory_only(args.tiny, args.res, args.json)
    speed(args)


def memory_only(tiny, res, json_path):
    """--memory: the memory table alone (any machine)."""
    cuda = torch.cuda.is_available()
    batch, res = (2, 32) if tiny else (MEMORY_BATCH if cuda else 1, res or (512 if cuda else 256))
    rows = memory_table(tiny, batch, res)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=device_name(torch.device("cuda" if cuda else "cpu")), memory=rows), f, indent=1)


def speed(args):
    """The memory table (unless left out of --cases), then the speed table."""
    dev = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        args.batch, args.res, args.iters, args.steps, args.sample_batch = 2, 32, 2, 3, 1
        args.compile = "none"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    cases = args.cases.split(",")
    peak = matmul_peak(dev)
    # the memory rows first, each in a process of its own, while this one holds nothing on the device
    memory = memory_table(args.tiny, args.batch if args.tiny else MEMORY_BATCH, args.res) if "memory" in cases else []
    table = SpeedTable(args, dev, peak, memory)
    for compiled in [False, True] if args.compile == "all" else [False]:
        table.run(cases, compiled)
    print_table(table.rows, device_name(dev), peak, args.batch, args.res)
    if memory:
        print_memory_header(args.tiny, memory[0]["batch"], memory[0]["res"], dev.type == "cuda")
        print("\n".join(memory_line(r) for r in memory))


def references(ours, dev):
    """The diffusers UNet and VAE and the transformers CLIP and text tower, built from our configs' public JSON
    and holding our random weights -> (unet, vae, clip, text)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel
    with torch.device(dev):
        unet = UNet2DConditionModel(**ours.unet.cfg.to_json())
        vae = AutoencoderKL(**ours.vae.cfg.to_json())
        clip = CLIPModel(CLIPConfig.from_dict(ours.clip.cfg.to_json()))
        text = CLIPTextModel(CLIPTextConfig.from_dict(ours.clip.cfg.to_json(text_only=True)))
    unet.load_state_dict(ours.unet.state_dict())
    vae.load_state_dict(ours.vae.state_dict())
    clip.load_state_dict(ours.clip.state_dict(), strict=False)  # transformers keeps position_ids buffers
    text.load_state_dict(ours.clip.text_model.state_dict(), strict=False)
    vae.requires_grad_(False)
    text.requires_grad_(False)
    return unet, vae, clip, text


def tuned(m):
    """A reference as tuned: torch.compile + channels-last."""
    return torch.compile(m.to(memory_format=torch.channels_last))


class SpeedTable:
    """Each case's references (as shipped, tuned) and ours, eager then compiled, on the same random weights,
    inputs and precision. `fn` of each row dies with its `add`, so its optimizer state is not resident while
    the next row is measured."""

    def __init__(self, args, dev, peak, memory):
        self.args, self.dev, self.peak, self.memory = args, dev, peak, memory
        self.amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")  # CPU bf16 is slow
        self.rows, self.flops = [], {}
        torch.manual_seed(0)
        with torch.device(dev):  # random init straight on the device
            self.ours = ours = random_model(args.tiny)
        ours.to(dev)
        if dev.type == "cuda":  # as train.py runs it
            ours.unet.to(memory_format=torch.channels_last)
            ours.vae.to(memory_format=torch.channels_last)
        self.g = torch.Generator().manual_seed(0)
        self.x = (torch.rand(args.batch, 3, args.res, args.res, generator=self.g) * 2 - 1).to(dev)
        self.ids = ours.tokenizer([f"a photo of garment number {i}" for i in range(args.batch)]).to(dev)
        self.pixels = F.interpolate(self.x, size=ours.clip.cfg.vision.image_size, mode="bicubic", antialias=True)
        self.ref_unet, self.ref_vae, self.ref_clip, self.ref_text = references(ours, dev)
        self.variants = [("as shipped", lambda m: m)] + ([] if args.compile == "none" else
                                                         [("compiled+channels-last", tuned)])

    def add(self, case, impl, fn, n=None):
        """Time one row; the first row of a case also counts its FLOPs; --json is rewritten after each row."""
        args, dev = self.args, self.dev
        iters = max(2, args.iters // 3) if case == "sample" else args.iters  # 50 UNet calls each
        # 5 warm-up steps: compiling, and recompiling once RSC's row count has changed (then a dynamic batch);
        # one sampler call holds 50 UNet calls of fixed shapes
        sec, mem, step_mem = timed(fn, dev, 1 if args.tiny or case == "sample" else 5, iters)
        if case in ("sd", "clip", "unidiff") and case not in self.flops:
            self.flops[case] = count_flops(fn)
        n = n or args.batch
        self.rows.append(dict(case=case, impl=impl, img_s=n / sec, ms=sec * 1e3, mem_gb=mem, step_gb=step_mem,
                              mfu=self.flops[case] / sec / self.peak if case in self.flops else float("nan")))
        print(f"{case:8s} {impl:36s} {n / sec:8.2f} img/s {sec * 1e3:9.1f} ms" + (f" {mem:6.1f} GB" if dev.type == "cuda"
                                                                                  else ""), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(device=device_name(dev), peak=self.peak, batch=args.batch, res=args.res, rows=self.rows,
                               memory=self.memory), f, indent=1)

    def train_only(self, *parts):
        self.ours.requires_grad_(False)
        for part in parts:
            part.requires_grad_(True)

    def run(self, cases, compiled):
        """One pass over the cases: the references and ours eager, or (compiled) ours compiled."""
        tag = "ours compiled" if compiled else "ours"
        if compiled:
            self.ours.compile()  # in place, as train.py --compile
        if "sd" in cases:
            self.sd(tag, compiled)
        if "clip" in cases:
            self.clip(tag, compiled)
        if "unidiff" in cases:
            self.train_only(self.ours.unet, self.ours.clip)
            self.add("unidiff", tag, our_step(self.ours, self.x, self.ids, self.dev, self.amp))
        free()
        if "sample" in cases:
            self.sample(tag, compiled)
        free()

    def sd(self, tag, compiled):
        ours, dev, amp = self.ours, self.dev, self.amp
        if not compiled:
            for name, tune in self.variants:
                self.add("sd", f"diffusers {name}", reference_sd_step(tune(self.ref_unet), self.ref_vae, self.ref_text,
                                                                     self.x, self.ids, ours.alphas_cumprod, dev, amp))
            self.ref_unet.to(memory_format=torch.contiguous_format)
        self.train_only(ours.unet)
        self.add("sd", tag, our_step(ours, self.x, self.ids, dev, amp, lambda_itc=0, lambda_rsc=0))

    def clip(self, tag, compiled):
        if not compiled:
            for name, tune in self.variants:
                self.add("clip", f"transformers {name}",
                         reference_clip_step(self.ref_clip, self.pixels, self.ids, self.dev, self.amp, tune is tuned))
        self.train_only(self.ours.clip)
        self.add("clip", tag, our_step(self.ours, self.x, self.ids, self.dev, self.amp, lambda_is=0, lambda_rsc=0))

    def sample(self, tag, compiled):
        ours, amp, s, steps = self.ours, self.amp, self.args.sample_batch, self.args.steps
        self.train_only()
        lat = torch.randn(s, 4, self.args.res // ours.down, self.args.res // ours.down, generator=self.g).to(self.dev)
        with torch.no_grad(), amp:
            ctx = ours.clip.text_hidden(self.ids[:s])
            unc = ours.clip.text_hidden(ours.empty_ids).expand(s, -1, -1)
        if not compiled:
            for name, tune in self.variants:
                with amp:
                    self.add("sample", f"diffusers {name}",
                             reference_sampler(tune(self.ref_unet), self.ref_vae, ctx, unc, lat, steps, 7.5), n=s)
            self.ref_unet.to(memory_format=torch.contiguous_format)
        with amp:
            self.add("sample", tag, our_sampler(ours, ctx, unc, lat, steps, 7.5), n=s)


def device_name(dev):
    return f"{torch.cuda.get_device_name() if dev.type == 'cuda' else 'CPU'}, torch {torch.__version__}"


def print_table(rows, device, peak, batch, res):
    rate = f"; measured bf16 matmul {peak / 1e12:.0f} TFLOP/s" if peak == peak else ""  # NaN off CUDA
    print(f"\n{device}; batch {batch}, {res} px, bf16 autocast on CUDA{rate}\n")
    print("peak GB: the process's peak allocation; step GB: that peak less the memory allocated before the row's "
          "first call (activations, gradients, optimizer state); on CUDA only. The memory table (below) measures "
          "train.py's step alone, each row in a process of its own.\n")
    print("| case | implementation | img/s | ms/step | peak GB | step GB | MFU | vs faster reference |")
    print("|---|---|---|---|---|---|---|---|")
    best = {}
    for r in rows:
        if not r["impl"].startswith("ours"):
            best[r["case"]] = max(best.get(r["case"], 0), r["img_s"])
    if "sd" in best and "clip" in best:  # the UniDiff step against the two reference steps run one after the other
        best["unidiff"] = 1 / (1 / best["sd"] + 1 / best["clip"])
    for r in rows:
        ratio = f"{r['img_s'] / best[r['case']]:.2f}x" if r["impl"].startswith("ours") and r["case"] in best else ""
        mfu = f"{100 * r['mfu']:.0f} %" if r["mfu"] == r["mfu"] else ""
        mem, step = (f"{r[k]:.1f}" if r[k] == r[k] else "" for k in ("mem_gb", "step_gb"))
        print(f"| {r['case']} | {r['impl']} | {r['img_s']:.2f} | {r['ms']:.1f} | {mem} | {step} | {mfu} | {ratio} |")


if __name__ == "__main__":
    main()
