"""Stable Diffusion's autoencoder (diffusers' AutoencoderKL), small enough to read in one sitting.

Attribute names are diffusers' checkpoint keys: `vae/diffusion_pytorch_model.safetensors` loads strictly, unrenamed.
The modules need only torch and einops; the config and loaders at the end read files through weights.py."""
import time
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from weights import WeightsError, find_weights, load_strict, read_config, read_safetensors

EPS = 1e-6  # every GroupNorm of diffusers' AutoencoderKL (the UNet's resnets use 1e-5)


def maybe_ckpt(on, fn, *args):
    """fn(*args), recomputed in backward instead of stored when `on` (the same 3 lines as in unet.py and clip.py)."""
    return checkpoint(fn, *args, use_reentrant=False) if on and torch.is_grad_enabled() else fn(*args)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D without a time embedding: GroupNorm-SiLU-conv twice, plus the input."""

    def __init__(self, cin, cout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None  # match channels on the skip path

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom only: the VAE weights were trained with this padding."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H//2, W//2)


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class SpatialAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual (the VAE's mid-block attention)."""

    def __init__(self, c, groups):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # diffusers keeps a dropout at to_out.1

    def forward(self, x):
        h = rearrange(self.group_norm(x), "b c h w -> b (h w) c")  # a view under channels-last
        q, k, v = self.to_q(h)[:, None], self.to_k(h)[:, None], self.to_v(h)[:, None]  # (B, 1, HW, C)
        h = self.to_out[0](F.scaled_dot_product_attention(q, k, v)[:, 0])  # (B, HW, C)
        return x + rearrange(h, "b (h w) c -> b c h w", h=x.shape[2])


class MidBlock(nn.Module):
    def __init__(self, c, groups):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([SpatialAttention(c, groups)])

    def forward(self, x, ckpt):
        x = maybe_ckpt(ckpt, self.resnets[0], x)
        x = maybe_ckpt(ckpt, self.attentions[0], x)
        return maybe_ckpt(ckpt, self.resnets[1], x)


class Level(nn.Module):
    """One resolution level: resnets, then a downsampler (encoder) or upsampler (decoder), None at the last level."""

    def __init__(self, cin, cout, n, groups, down=False, up=False):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(n)])
        self.downsamplers = nn.ModuleList([Downsample(cout)]) if down else None
        self.upsamplers = nn.ModuleList([Upsample(cout)]) if up else None

    def forward(self, x, ckpt):
        for resnet in self.resnets:
            x = maybe_ckpt(ckpt, resnet, x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, down=i < n - 1)
                                          for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x, ckpt):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x, ckpt)  # (B, C_i, H/2^i, W/2^i)
        x = self.mid_block(x, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent, H/8, W/8) for SD


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        self.up_blocks = nn.ModuleList([Level(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, up=i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z, ckpt):
        x = self.mid_block(self.conv_in(z), ckpt)
        for block in self.up_blocks:
            x = block(x, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # a VAEConfig (below)
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
        self.grad_ckpt = False  # recompute each resnet/attention in backward (saves activation memory)

    def encode(self, x):
        """x in [-1, 1], (B, 3, H, W) -> mean, logvar of the latent posterior, each (B, 4, H/8, W/8)."""
        mean, logvar = self.quant_conv(self.encoder(x, self.grad_ckpt)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps the same

    def decode(self, z):
        """Unscaled latents (B, 4, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z), self.grad_ckpt)

    @classmethod
    def from_state_dict(cls, sd, cfg=None, source="state dict"):
        sd = rename_old_keys(sd)
        return load_strict(cls(cfg or infer_config(sd)), sd, source)


# -----------------------------------------------------------------------------
# Config (diffusers' config.json both ways), presets, shape inference, loading


@dataclass
class VAEConfig:
    # Field names are diffusers' config.json keys, so a config round-trips without a mapping.
    in_channels: int = 3                  # image channels (in and out)
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2             # resnets per encoder level (the decoder has one more)
    norm_num_groups: int = 32
    sample_size: int = 512                # unused here; kept in config.json, where diffusers sizes its tiles from it
    scaling_factor: float = 0.18215       # latents are multiplied by this before the UNet sees them

    def to_json(self):
        """diffusers' AutoencoderKL config.json, so a saved folder opens with from_pretrained."""
        n = len(self.block_out_channels)
        return {"_class_name": "AutoencoderKL", **asdict(self), "block_out_channels": list(self.block_out_channels),
                "out_channels": self.in_channels, "act_fn": "silu",
                "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}

    @classmethod
    def from_json(cls, d):
        """Our config from diffusers' config.json; refuses variants this module does not build."""
        n = len(d.get("block_out_channels", cls.block_out_channels))
        required = {"act_fn": "silu", "out_channels": d.get("in_channels", 3), "use_quant_conv": True,
                    "use_post_quant_conv": True, "mid_block_add_attention": True,
                    "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}
        bad = [f"{k}={d[k]!r}" for k, v in required.items() if k in d and _aslist(d[k]) != _aslist(v)]
        if bad:
            raise WeightsError(f"unsupported AutoencoderKL config: {', '.join(bad)}")
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


def _aslist(v):  # config.json has lists, a live diffusers config may hold tuples
    return list(v) if isinstance(v, (list, tuple)) else v


PRESETS = {
    "sd": VAEConfig(),  # SD 1.x and 2.x share this autoencoder
    "tiny": VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),  # CPU, 2x
}


def rename_old_keys(sd):
    """diffusers < 0.14 named the mid-block attention query/key/value/proj_attn; today's names are to_q/k/v/out.0."""
    new = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
    out = {}
    for k, v in sd.items():
        head, _, tail = k.rpartition(".")  # tail is weight / bias
        parent, _, name = head.rpartition(".")
        if ".attentions." in k and name in new:
            k = f"{parent}.{new[name]}.{tail}"
            if v.ndim == 4:  # some conversions kept the original 1x1 convs: same numbers as a Linear
                v = v[:, :, 0, 0]
        out[k] = v
    return out


def infer_config(sd):
    """A VAEConfig from tensor shapes alone (for a file with no config.json beside it)."""
    try:
        n = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down_blocks."))
        ch = tuple(sd[f"encoder.down_blocks.{i}.resnets.0.conv2.weight"].shape[0] for i in range(n))
        layers = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.down_blocks.0.resnets."))
        cfg = VAEConfig(in_channels=sd["encoder.conv_in.weight"].shape[1], block_out_channels=ch,
                        latent_channels=sd["post_quant_conv.weight"].shape[0], layers_per_block=layers)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"cannot infer a VAE config from these tensors (no {e}); an AutoencoderKL?") from None
    # GroupNorm's group count is not stored: a preset of the same shapes gives it, else SD's 32.
    shape = ("in_channels", "latent_channels", "block_out_channels", "layers_per_block")
    return next((p for p in PRESETS.values() if all(getattr(p, f) == getattr(cfg, f) for f in shape)), cfg)


def load_vae(path):
    """An AutoencoderKL safetensors file, or the folder holding it (config.json beside it is used if present)."""
    path = find_weights(path, ["diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"])
    cfg = read_config(path)
    return VAE.from_state_dict(read_safetensors(path), VAEConfig.from_json(cfg) if cfg else None, source=str(path))


PROGRESS_EVERY = 5  # seconds between progress lines of the fit


def fit_vae(vae, dataset, steps, seed, say, batch=16, lr=3e-3):
    """Fit a random (tiny) VAE as an autoencoder, then set its scaling factor for unit-variance latents, as SD did."""
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
    vae.cfg = replace(vae.cfg, scaling_factor=1 / std)  # saved in config.json, as SD's 0.18215
    say(f"tiny VAE fitted as an autoencoder: {steps} steps, reconstruction MSE {mse.item():.4f}, "
        f"scaling factor {1 / std:.4f} ({time.time() - t0:.0f}s)")
