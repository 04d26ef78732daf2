"""UniDiff: one CLIP and one Stable Diffusion trained together with ITC + IS + RSC. The loss math is in the README.

The text tower is shared: CLIP's `text_hidden` is the UNet's context, its pooled projection the text side of ITC and
RSC. The VAE is frozen (RSC decodes *through* it, with gradient). Also here: the DDIM sampler, and loading/saving the
diffusers and transformers folder layouts (the single-file layout of ComfyUI / A1111: single_file.py)."""
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clip import CLIP, MEAN, STD, PRESETS as CLIP_PRESETS, Tokenizer, load_clip
from losses import (anchored_loss, gather, grad_times, is_loss, itc_loss, relational_loss, rsc_feature_loss, rsc_loss,
                    snr, step_rows, v_target, world_size)
from unet import PRESETS as UNET_PRESETS, UNet, load_unet
from vae import PRESETS as VAE_PRESETS, VAE, load_vae
from single_file import SCHEDULER_KEY, load_single_file, to_single_file
from weights import WeightsError, save_model, save_safetensors

log = logging.getLogger("unidiff")


def sd_alphas_cumprod():
    """SD's "scaled_linear" schedule, ᾱ_t = Π(1 − β), β = linspace(√0.00085, √0.012, 1000)², in float32 as diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    return torch.cumprod(1 - betas, 0)


def x0_and_eps(zt, out, a, v_prediction):
    """The UNet's output `out` at z_t = √ᾱ z0 + √(1-ᾱ) ε, ᾱ = a -> its estimates (ẑ0, ε̂).
    `out` is ε̂, or with v_prediction v̂ = √ᾱ ε − √(1-ᾱ) z0 (SD 2.x-v)."""
    if v_prediction:
        return a.sqrt() * zt - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * zt
    return (zt - (1 - a).sqrt() * out) / a.sqrt(), out


@torch.no_grad()
def ddim_sample(unet, latents, context, uncond, alphas_cumprod, steps, guidance, eta=0.0, generator=None,
                v_prediction=False):
    """DDIM with classifier-free guidance, step for step diffusers' DDIMScheduler under SD 1.5's config (steps_offset=1,
    set_alpha_to_one=False, clip_sample=False, "leading" spacing). latents (B, 4, h, w) ~ N(0, I); context (B, 77, W)
    the prompts' text states, uncond (1 or B, 77, W) the empty caption's. Returns ẑ0."""
    ratio = len(alphas_cumprod) // steps
    ac = alphas_cumprod.to(latents.device)
    ctx = torch.cat([uncond.expand_as(context), context]).to(latents.dtype)  # (2B, 77, W)
    x = latents
    for t in [i * ratio + 1 for i in reversed(range(steps))]:  # 981, 961, ..., 1 for 50 steps
        out_u, out_c = unet(torch.cat([x, x]), torch.full((), t, device=x.device), ctx).float().chunk(2)
        out = out_u + guidance * (out_c - out_u)  # (B, 4, h, w): ε̂ = ε̂_u + guidance (ε̂_c − ε̂_u)
        a = ac[t]
        a_prev = ac[t - ratio] if t >= ratio else ac[0]  # the last step lands on ᾱ_0, not 1
        x0, eps = x0_and_eps(x, out, a, v_prediction)
        sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()  # the noise added back: 0 for eta = 0
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps  # ẑ0 re-noised along ε̂, to t - ratio
        if eta > 0:
            x_prev = x_prev + sigma * torch.randn(x_prev.shape, generator=generator, dtype=x_prev.dtype).to(x.device)
        x = x_prev.to(latents.dtype)
    return x


def centre_square(x):
    """(..., H, W) -> its centre (..., S, S), S = min(H, W): CLIP's crop of a non-square image: it keeps the aspect."""
    H, W = x.shape[-2:]
    S = min(H, W)
    top, left = (H - S) // 2, (W - S) // 2
    return x[..., top:top + S, left:left + S]


def clip_normalise(x01):
    """Images in [0, 1] (B, 3, H, W) -> CLIP's input normalisation."""
    mean, std = (torch.tensor(v, device=x01.device, dtype=x01.dtype).view(3, 1, 1) for v in (MEAN, STD))
    return (x01 - mean) / std


class Encoded(NamedTuple):
    """Training images as the frozen networks first see them (UniDiff.encode), computed once and cached by
    train.py --cache-latents: `losses` takes them in place of the pixels, the same step without the VAE encoder."""
    mean: torch.Tensor  # (B, 4, h, w) the frozen VAE's posterior: its mean
    logvar: torch.Tensor  # (B, 4, h, w) and log-variance
    clip: torch.Tensor  # (B, 3, res, res) CLIP's view, clip_pixels

    def to(self, device, non_blocking=False):
        return Encoded(*(t.to(device, non_blocking=non_blocking) for t in self))


class BatchDraws:
    """This rank's share of a training batch's randomness: every rank draws for the whole global batch (W·B rows) and
    keeps its B rows, so N DDP ranks equal one process. From `generator` (CPU), in order: a device generator's seed,
    then t and the caption dropout on the host (RSC's rows are chosen without a sync); the VAE's posterior sample and
    ε from the device generator. With no generator, all from torch's global RNG."""

    def __init__(self, generator, B, device):
        rank = dist.get_rank() if world_size() > 1 else 0
        self.n, self.mine = world_size() * B, slice(rank * B, (rank + 1) * B)  # the global batch's rows, this rank's
        self.generator, self.device, self.device_generator = generator, device, None
        if generator is not None:  # the first draw; t is the second (contrastive_cache redraws it)
            seed = int(torch.randint(2**62, (), generator=generator))
            self.device_generator = torch.Generator(device).manual_seed(seed)

    def timesteps(self, T):
        """t ~ U{0..T-1} for the global batch (W·B,), on the host: RSC counts its rows there."""
        return torch.randint(0, T, (self.n,), generator=self.generator)

    def dropout(self, p):
        """Which of this rank's captions become "" (B,) bool, on the device: each with probability p."""
        return self.to_device(torch.rand(self.n, generator=self.generator)[self.mine] < p)

    def randn(self, shape):
        """This rank's rows of an N(0, I) draw for the global batch -> (B, *shape) on the device."""
        return torch.randn((self.n, *shape), generator=self.device_generator, device=self.device)[self.mine]

    def to_device(self, x):
        """A host tensor on the device, through pinned memory on CUDA so the copy does not block the host."""
        return x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" else x.to(self.device)


class UniDiff(nn.Module):
    def __init__(self, clip, unet, vae, v_prediction=False):
        super().__init__()
        if unet.cfg.cross_attention_dim != clip.cfg.text.hidden_size:
            raise WeightsError(f"the UNet attends to {unet.cfg.cross_attention_dim}-wide text states but the CLIP "
                               f"text tower is {clip.cfg.text.hidden_size} wide: they cannot share one text encoder")
        z, cin, cout = vae.cfg.latent_channels, unet.cfg.in_channels, unet.cfg.out_channels
        if (cin, cout) != (z, z):  # checked here: it would otherwise fail deep inside the first step
            what = " (an inpainting model?)" if cin == 2 * z + 1 else ""  # + masked-image latents + mask
            raise WeightsError(f"this UNet takes {cin} input channels and gives {cout}{what}; UniDiff trains "
                               f"text-to-image UNets, with {z} in and {z} out = the VAE's latent channels")
        self.clip, self.unet, self.vae = clip, unet, vae
        self.vae.requires_grad_(False)  # frozen: RSC back-propagates through its decoder, never into it
        self.lora = nn.ModuleDict()  # train.py --lora: adapters hooked on the networks' layers (lora.py); none here
        self.v_prediction = v_prediction  # SD 2.x-v checkpoints predict v = √ᾱ ε − √(1-ᾱ) z0
        self.register_buffer("alphas_cumprod", sd_alphas_cumprod())
        self.tokenizer = Tokenizer()
        self.register_buffer("empty_ids", self.tokenizer([""]), persistent=False)  # (1, 77): BOS, EOS, EOS...

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # keep the schedule in float32 under .half()/.to(bf16): 1-ᾱ needs the bits
        self.alphas_cumprod = sd_alphas_cumprod().to(self.alphas_cumprod.device)
        return self

    @property
    def down(self):
        """Pixels per latent pixel: the VAE halves the size at all but its last level (8 for SD)."""
        return 2 ** (len(self.vae.cfg.block_out_channels) - 1)

    @property
    def multiple(self):
        """Image sides must be multiples of this (64 for SD): `down` × 2^(UNet levels − 1), so every UNet level halves
        the latent exactly and RSC's centred latent crop is, pixel for pixel, clip_pixels' crop of the real image."""
        return self.down * 2 ** (len(self.unet.cfg.block_out_channels) - 1)

    def clip_pixels(self, pixels):
        """Pixels in [-1, 1] at any size -> CLIP's input: the centre square, resized to CLIP's resolution, normalised."""
        res = self.clip.cfg.vision.image_size
        x = F.interpolate(centre_square(pixels), size=(res, res), mode="bicubic", antialias=True, align_corners=False)
        return clip_normalise((x + 1) / 2)  # (B, 3, res, res)

    @torch.no_grad()
    def encode(self, pixels):
        """Pixels (B, 3, H, W) in [-1, 1] -> Encoded: what `losses` makes of them with frozen networks alone."""
        return Encoded(*self.vae.encode(pixels), self.clip_pixels(pixels))

    def clip_view(self, images):  # CLIP's input (B, 3, res, res)
        return images.clip if isinstance(images, Encoded) else self.clip_pixels(images)

    def forward(self, *args, **kwargs):  # so DistributedDataParallel(model)(pixels, ids) computes the losses
        return self.losses(*args, **kwargs)

    def compile(self, **kwargs):
        """torch.compile each network in place (state-dict keys unchanged). The glue in `losses` stays eager:
        its host-side randomness and RSC's variable row count would break a whole-step graph anyway."""
        for m in (self.unet, self.vae.encoder, self.vae.decoder, self.clip.text_model, self.clip.vision_model):
            if m is not None:
                m.compile(**kwargs)

    def losses(self, images, ids, lambda_itc=1.0, lambda_is=1.0, lambda_rsc=0.1, t_max=500, p_uncond=0.1,
               snr_gamma=None, rsc_form="kl", is_detach_text=False, anchor=None, generator=None, cache=None, micro_step=0):
        """images: pixels (B, 3, H, W) in [-1, 1], or those Encoded (cached); ids (B, 77) -> dict(itc, is_, rsc, total),
        as the README's "The losses" writes them (a λ of 0: not computed, 0). `rsc_form`: kl (losses.rsc_loss),
        kl-one-way, feature, relational or anchored (needs `anchor`, the frozen start CLIP). `generator` (CPU) fixes
        the randomness (BatchDraws). With gradient accumulation `cache` is the step's contrastive_cache and this its
        micro-step `micro_step`. Each entry is this rank's and micro-step's part; the parts' mean is the step's
        (relational and anchored RSC relate this part's rows alone)."""
        B = len(ids)
        draws = BatchDraws(generator, B, ids.device)
        K = 1 if cache is None else len(cache["txt"])  # micro-steps in this optimizer step
        diffuse = lambda_is or lambda_rsc
        # one text pass serves all three losses; its extra row is the empty caption that dropped captions get
        hidden = self.clip.text_hidden(torch.cat([ids, self.empty_ids]) if diffuse else ids)  # (B[+1], 77, W)
        hidden, empty = hidden[:B], hidden[B:]
        itc = is_ = rsc = torch.zeros((), device=ids.device)
        if lambda_itc or lambda_rsc:
            txt_emb = self.clip.pool_text(hidden, ids)  # (B, D)
            txt_all = step_rows(txt_emb, cache and cache["txt"], micro_step)  # (K·W·B, D): the step's captions
            real = self.clip_view(images)  # (B, 3, res, res)
        if lambda_itc:  # the whole step's ITC; this part's rows get their share of its gradient (× K: losses.py)
            img_emb = self.clip.encode_image(real)  # (B, D)
            img_all = step_rows(img_emb, cache and cache["img"], micro_step)  # (K·W·B, D)
            itc = itc_loss(grad_times(img_all, K), grad_times(txt_all, K), self.clip.logit_scale)
        if diffuse:  # IS: the UNet's ε̂ (or v̂) at z_t, its caption replaced by "" with probability p_uncond (CFG)
            t_all = draws.timesteps(len(self.alphas_cumprod))  # (W·B,) on the host
            t, drop = draws.to_device(t_all[draws.mine]), draws.dropout(p_uncond)  # (B,) each
            z0, noise, zt = self.noised_latents(images, t, draws)  # (B, 4, h, w) each
            context = torch.where(drop[:, None, None], empty, hidden)
            mid = []  # relational RSC reads the UNet's own features: its mid-block output, pooled (B, C)
            hook = self.unet.mid_block.resnets[1].register_forward_hook(lambda m, i, o: mid.append(o.mean((2, 3)))) \
                if lambda_rsc and rsc_form == "relational" else None
            pred = self.unet(zt, t, context.detach() if is_detach_text else context)
            if hook:
                hook.remove()
            target = v_target(z0, noise, self.alphas_cumprod, t) if self.v_prediction else noise
            is_ = is_loss(pred, target, snr(self.alphas_cumprod, t), snr_gamma or None, self.v_prediction)
        if lambda_rsc and rsc_form == "anchored":  # the batch's images and captions, read by the live and the start CLIP
            with torch.no_grad():
                img0, txt0 = anchor.encode_image(real), anchor.encode_text(ids)
            rsc = anchored_loss(img_emb if lambda_itc else self.clip.encode_image(real), txt_emb, self.clip.logit_scale,
                                img0, txt0, anchor.logit_scale)
        elif lambda_rsc and rsc_form == "relational":  # this micro-batch's rows with t < t_max: CLIP's vs the UNet's view
            sel = draws.to_device((t_all[draws.mine] < t_max).nonzero()[:, 0])
            rsc = relational_loss(img_emb[sel] if lambda_itc else self.clip.encode_image(real[sel]), mid[0][sel])
        elif lambda_rsc:  # RSC: the R rows with t < t_max, real and generated in one step, against the step's captions
            rows = (t_all[draws.mine] < t_max).nonzero()[:, 0]  # on the host: no sync, R = len(rows) known
            # every rank runs the towers if any has rows, R = 0 or not: under FSDP each rank's forward gathers weights
            if (t_all < t_max).any():
                sel = draws.to_device(rows)
                gen_emb = self.clip.encode_image(self.one_step_images(zt[sel], pred[sel], t[sel], real.shape[-1]))
                real_emb = img_emb[sel] if lambda_itc else self.clip.encode_image(real[sel])  # (R, D) each
            else:  # a zero still in the graph
                real_emb = gen_emb = txt_emb.new_zeros(0, txt_emb.shape[1])
            # this part's rows are one of W·K parts of the step's RSC rows (host tensors: no sync)
            n_rows = int((t_all < t_max).sum()) if cache is None else cache["rsc_rows"]
            n = max(n_rows, 1) / (world_size() * K)
            rsc = rsc_feature_loss(real_emb, gen_emb, n) if rsc_form == "feature" else \
                rsc_loss(real_emb, gen_emb, txt_all, self.clip.logit_scale, n, one_way=rsc_form == "kl-one-way")
        return dict(itc=itc, is_=is_, rsc=rsc, total=lambda_itc * itc + lambda_is * is_ + lambda_rsc * rsc)

    def noised_latents(self, images, t, draws):
        """IS's input: z0 = f · a sample of the frozen VAE's posterior of the images (pixels, or Encoded: cached),
        ε ~ N(0, I), z_t = √ᾱ_t z0 + √(1-ᾱ_t) ε -> (z0, ε, z_t), each (B, 4, h, w) in fp32."""
        with torch.no_grad():  # frozen VAE: the latents are data
            posterior = (images.mean, images.logvar) if isinstance(images, Encoded) else self.vae.encode(images)
            mean, logvar = (v.float() for v in posterior)  # fp32 under autocast: z0, ε, IS target
            z0 = self.vae.cfg.scaling_factor * (mean + (0.5 * logvar).exp() * draws.randn(mean.shape[1:]))
        noise = draws.randn(z0.shape[1:])
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return z0, noise, a.sqrt() * z0 + (1 - a).sqrt() * noise

    def one_step_images(self, zt, pred, t, res):
        """RSC's generated images: the UNet's one-step estimate ẑ0 (its centre square, as clip_pixels crops the real
        one) decoded through the frozen VAE at CLIP's resolution `res`, with gradient -> CLIP's input (R, 3, res, res)."""
        z0_hat, _ = x0_and_eps(zt, pred.float(), self.alphas_cumprod[t].view(-1, 1, 1, 1), self.v_prediction)
        z0_hat = F.interpolate(centre_square(z0_hat), size=(res // self.down,) * 2, mode="bilinear",
                               antialias=True)  # (R, 4, h', w')
        x_hat = self.vae.decode(z0_hat / self.vae.cfg.scaling_factor)  # (R, 3, res, res) in about [-1, 1]
        return clip_normalise((x_hat + 1) / 2)

    @torch.no_grad()
    def contrastive_cache(self, micro_batches, generators, lambda_itc, lambda_rsc, t_max):
        """Gradient caching: the CLIP embeddings of a step's K micro-batches without gradient, before its micro-steps,
        so that each micro-step's ITC and RSC contrast the whole step (losses.py). micro_batches: this rank's K
        (images, ids); generators: the micro-steps' (copies redraw t, to count RSC's rows in the step).
        -> dict(img=K × (W·b, D) (empty when λ_itc = 0), txt=K × (W·b, D), rsc_rows=over all ranks)."""
        img, txt, rsc_rows = [], [], 0
        for (images, ids), g in zip(micro_batches, generators):
            txt.append(gather(self.clip.encode_text(ids)))
            if lambda_itc:
                img.append(gather(self.clip.encode_image(self.clip_view(images))))
            if lambda_rsc:  # the micro-step's t, as `losses` will draw it
                draws = BatchDraws(torch.Generator().set_state(g.get_state()), len(ids), ids.device)
                rsc_rows += int((draws.timesteps(len(self.alphas_cumprod)) < t_max).sum())
        return dict(img=img, txt=txt, rsc_rows=rsc_rows)

    def image_embeddings(self, pixels):
        """Pixels (B, 3, H, W) in [-1, 1] -> CLIP's projected image embeddings (B, D), not normalised."""
        return self.clip.encode_image(self.clip_pixels(pixels))

    def text_embeddings(self, ids):
        """(B, 77) token ids -> CLIP's projected text embeddings (B, D), not normalised."""
        return self.clip.encode_text(ids)

    @torch.no_grad()
    def generate(self, prompts, steps=50, guidance=7.5, seed=0, height=512, width=512):
        """Text -> images, uint8 (B, H, W, 3): DDIM with classifier-free guidance, then the VAE decoder."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        dev, dtype = self.unet.conv_in.weight.device, self.unet.conv_in.weight.dtype  # the UNet's device and dtype
        ids = self.tokenizer(prompts).to(dev)
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same images on every device
        shape = (len(prompts), self.unet.cfg.in_channels, height // self.down, width // self.down)
        latents = torch.randn(shape, generator=g).to(dev, dtype)
        z = ddim_sample(self.unet, latents, self.clip.text_hidden(ids), self.clip.text_hidden(self.empty_ids),
                        self.alphas_cumprod, steps, guidance, v_prediction=self.v_prediction)
        x = self.vae.decode(z / self.vae.cfg.scaling_factor).float()  # (B, 3, H, W) in about [-1, 1]
        return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()

    @classmethod
    def tiny(cls, seed=0, v_prediction=False):
        """A random, CPU-sized UniDiff (tests, `train.py --data demo`)."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            clip = CLIP(CLIP_PRESETS["tiny"])
            unet = UNet(replace(UNET_PRESETS["tiny"], cross_attention_dim=clip.cfg.text.hidden_size))
            return cls(clip, unet, VAE(VAE_PRESETS["tiny"]), v_prediction)

    @classmethod
    def from_pretrained(cls, sd, clip=None):
        """`sd`: a diffusers folder (unet/, vae/, text_encoder/) or an original single-file .safetensors.
        `clip`: a transformers CLIP file or folder whose text tower becomes THE text encoder (SD 1.x's text
        encoder is CLIP ViT-L/14's text tower). A folder written by `save` brings its own `clip/`."""
        sd = Path(sd)
        if sd.is_dir():
            unet, vae, text = load_unet(sd / "unet"), load_vae(sd / "vae"), load_clip(sd / "text_encoder")
            sched = sd / "scheduler" / "scheduler_config.json"
            sched = json.loads(sched.read_text()) if sched.is_file() else {}
            if clip is None and (sd / "clip").is_dir():
                clip = sd / "clip"
        else:
            unet, vae, text, sched = load_single_file(sd)
        v_pred = sched.get("prediction_type") == "v_prediction"
        if clip is None:
            return cls(text, unet, vae, v_pred)
        full = load_clip(clip)
        a, b = text.text_model.state_dict(), full.text_model.state_dict()
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k].to(a[k].dtype))
                                       for k in a):
            log.warning("%s: its text encoder differs from the CLIP text tower of %s; using the CLIP's "
                        "(one shared text encoder)", sd, clip)
        return cls(full, unet, vae, v_pred)

    def save(self, folder, single_file=False):
        """A diffusers StableDiffusionPipeline folder (+ `clip/`, a transformers CLIPModel, when there is a
        vision tower); with `single_file`, also `model_single_file.safetensors` in the original layout."""
        folder = Path(folder)
        for name, model in (("unet", self.unet), ("vae", self.vae)):
            save_model(folder / name, "diffusion_pytorch_model.safetensors", model.state_dict(), model.cfg.to_json())
        self.clip.save(folder / "text_encoder", text_only=True)  # SD's text_encoder: the shared text tower
        if self.clip.vision_model is not None:
            self.clip.save(folder / "clip")
        self.tokenizer.save(folder / "tokenizer")
        (folder / "scheduler").mkdir(exist_ok=True)
        sched = dict(_class_name="DDIMScheduler", num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", steps_offset=1, set_alpha_to_one=False, clip_sample=False,
                     timestep_spacing="leading", prediction_type="v_prediction" if self.v_prediction else "epsilon")
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
        (folder / "model_index.json").write_text(json.dumps(dict(
            _class_name="StableDiffusionPipeline", unet=["diffusers", "UNet2DConditionModel"],
            vae=["diffusers", "AutoencoderKL"], text_encoder=["transformers", "CLIPTextModel"],
            tokenizer=["transformers", "CLIPTokenizer"], scheduler=["diffusers", "DDIMScheduler"],
            safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False), indent=2))
        if single_file:
            save_safetensors(to_single_file(self.unet, self.vae, self.clip), folder / "model_single_file.safetensors",
                             metadata={"format": "pt", SCHEDULER_KEY: json.dumps(sched)})  # the file alone keeps it
