"""Stable Diffusion's denoising UNet (diffusers' UNet2DConditionModel for SD 1.x and 2.x) on one page.

Attribute names are diffusers' checkpoint keys: `unet/diffusion_pytorch_model.safetensors` loads strictly, unrenamed.
The whole forward pass is UNet.forward. The modules need only torch and einops; the loaders use weights.py."""
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from weights import WeightsError, find_weights, load_strict, read_config, read_safetensors


def maybe_ckpt(on, fn, *args):
    """fn(*args), recomputed in backward instead of stored when `on` (the same 3 lines as in vae.py and clip.py)."""
    return checkpoint(fn, *args, use_reentrant=False) if on and torch.is_grad_enabled() else fn(*args)


def timestep_embedding(t, dim):
    """SD's sinusoidal embedding (B,) -> (B, dim): frequencies exp(-ln(1e4) i / half) (freq_shift=0), cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]                  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], -1)  # cos half first: flip_sin_to_cos=True


class TimestepEmbedding(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, cout), nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D: GroupNorm-SiLU-conv twice, the time embedding added in between, plus the input."""

    def __init__(self, cin, cout, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=eps)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=eps)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None  # match channels on the skip path

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1) broadcast over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)  # (B, C, h/2, w/2), rounded up


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # nearest to the skip's size (odd sizes too)


class Attention(nn.Module):
    """Multi-head attention; cross-attention when `context` is given (keys/values from the text)."""

    def __init__(self, dim, heads, ctx_dim=None, upcast=False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers keeps a dropout at to_out.1

    def forward(self, x, context=None):
        ctx = x if context is None else context
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)
        q, k, v = split(self.to_q(x)), split(self.to_k(ctx)), split(self.to_v(ctx))
        if self.upcast and q.dtype == torch.float16:  # SD 2.1's logits overflow fp16 (bf16 has fp32's range)
            q, k, v = q.float(), k.float(), v.float()
        h = F.scaled_dot_product_attention(q, k, v).to(x.dtype)  # (B, heads, N, d)
        return self.to_out[0](rearrange(h, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    def __init__(self, din, dout):
        super().__init__()
        self.proj = nn.Linear(din, 2 * dout)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)  # GEGLU: first half gated by exact (erf) GELU of the second half


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention to the text, and a GEGLU feed-forward, each residual."""

    def __init__(self, dim, heads, ctx_dim, upcast):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, upcast=upcast)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, ctx_dim, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Module()  # a bare container so the keys read ff.net.0.proj / ff.net.2 like diffusers'
        self.ff.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim))  # net.1: dropout slot

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff.net(self.norm3(x))


def like(h, ref):
    """h in ref's memory format: a no-op under channels-last, one copy otherwise (as diffusers' .contiguous())."""
    cl = ref.is_contiguous(memory_format=torch.channels_last)
    return h.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)


class Transformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, proj_in, a transformer over the H*W pixels, proj_out, residual."""

    def __init__(self, c, heads, cfg):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, c, eps=1e-6)  # 1e-6 here, unlike the UNet's resnets
        self.proj_in = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(c, heads, cfg.cross_attention_dim, cfg.upcast_attention)])
        self.proj_out = nn.Linear(c, c) if self.linear else nn.Conv2d(c, c, 1)

    def forward(self, x, context):
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = rearrange(h, "b c h w -> b (h w) c")  # a view under channels-last
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = like(rearrange(h, "b (h w) c -> b c h w", h=x.shape[2]), x)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h


class Level(nn.Module):
    """One resolution level: resnets, maybe a transformer after each, maybe a down- or upsampler (lists: the keys)."""

    def __init__(self, resnets, attentions=None, down=None, up=None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.downsamplers = nn.ModuleList([down]) if down else None
        self.upsamplers = nn.ModuleList([up]) if up else None


class UNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # a UNetConfig (below)
        ch, n, L = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
        heads = cfg.num_heads if isinstance(cfg.num_heads, (list, tuple)) else (cfg.num_heads,) * n
        temb = 4 * ch[0]  # SD's time-embedding width
        res = lambda cin, cout: ResnetBlock(cin, cout, temb, cfg.norm_num_groups, cfg.norm_eps)
        attn = lambda i, k: [Transformer(ch[i], heads[i], cfg) for _ in range(k)] if cfg.cross_attn[i] else None

        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb)
        # skips: the channels forward pushes (conv_in, each down resnet, each downsampler); each up resnet pops one
        c, skips, self.down_blocks = ch[0], [ch[0]], nn.ModuleList()
        for i in range(n):
            resnets = [res(c if j == 0 else ch[i], ch[i]) for j in range(L)]
            c = ch[i]
            skips += [c] * (L + (i < n - 1))
            self.down_blocks.append(Level(resnets, attn(i, L), down=Downsample(c) if i < n - 1 else None))
        self.mid_block = Level([res(c, c), res(c, c)], [Transformer(c, heads[-1], cfg)])
        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            resnets = [res((c if j == 0 else ch[i]) + skips.pop(), ch[i]) for j in range(L + 1)]
            c = ch[i]
            self.up_blocks.append(Level(resnets, attn(i, L + 1), up=Upsample(c) if i > 0 else None))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.grad_ckpt = False  # recompute each resnet/transformer in backward (saves activation memory)

    def forward(self, x, t, context):
        """Noisy latents (B, 4, h, w), timesteps (B,) or scalar, text states (B, 77, D) -> noise (B, 4, h, w)."""
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = self.time_embedding(timestep_embedding(t, self.cfg.block_out_channels[0]).to(x.dtype))  # (B, 4*C0)
        ck = self.grad_ckpt

        h = self.conv_in(x)
        skips = [h]
        for level in self.down_blocks:
            for i, resnet in enumerate(level.resnets):
                h = maybe_ckpt(ck, resnet, h, temb)
                if level.attentions is not None:
                    h = maybe_ckpt(ck, level.attentions[i], h, context)
                skips.append(h)
            if level.downsamplers is not None:
                h = level.downsamplers[0](h)
                skips.append(h)
        mid = self.mid_block
        h = maybe_ckpt(ck, mid.resnets[0], h, temb)
        h = maybe_ckpt(ck, mid.attentions[0], h, context)
        h = maybe_ckpt(ck, mid.resnets[1], h, temb)
        for level in self.up_blocks:
            for i, resnet in enumerate(level.resnets):
                h = maybe_ckpt(ck, resnet, torch.cat([h, skips.pop()], dim=1), temb)  # (B, C + C_skip, h, w)
                if level.attentions is not None:
                    h = maybe_ckpt(ck, level.attentions[i], h, context)
            if level.upsamplers is not None:
                h = level.upsamplers[0](h, size=skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    @classmethod
    def from_state_dict(cls, sd, cfg=None, source="state dict"):
        return load_strict(cls(cfg or infer_config(sd)), sd, source)


# -----------------------------------------------------------------------------
# Config (diffusers' config.json both ways), presets, shape inference, loading


@dataclass
class UNetConfig:
    in_channels: int = 4                         # latent channels in and out
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)  # one entry per resolution level
    cross_attn: tuple = (True, True, True, False)       # levels with text cross-attention (the rest: resnets only)
    layers_per_block: int = 2                    # resnets per down level (up levels have one more)
    num_heads: object = 8                        # int or one per level; diffusers' config calls it attention_head_dim
    cross_attention_dim: int = 768               # width of the text encoder's hidden states
    use_linear_projection: bool = False          # SD 2.x: Linear proj_in/out; SD 1.x: 1x1 convs
    upcast_attention: bool = False               # SD 2.1: attention in fp32 when running in fp16
    norm_num_groups: int = 32
    norm_eps: float = 1e-5                       # the UNet's resnet GroupNorms use 1e-5 (the VAE's: 1e-6)
    sample_size: int = 64                        # unused here; in config.json diffusers' pipeline sizes images from it

    def to_json(self):
        """diffusers' UNet2DConditionModel config.json, so a saved folder opens with from_pretrained."""
        d = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in asdict(self).items()}
        heads, cross = d.pop("num_heads"), d.pop("cross_attn")
        return {"_class_name": "UNet2DConditionModel", **d, "attention_head_dim": heads, **FIXED,
                "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross],
                "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)]}

    @classmethod
    def from_json(cls, d):
        """Our config from diffusers' config.json; refuses the UNet variants this module does not build."""
        bad = [f"{k}={d[k]!r}" for k, v in FIXED.items()
               if k in d and d[k] != v and not (isinstance(d[k], list) and all(x == v for x in d[k]))]
        down, up = d.get("down_block_types", []), d.get("up_block_types", [])
        cross = [t == "CrossAttnDownBlock2D" for t in down]
        if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
                list(up) != ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross)]:
            bad.append(f"down_block_types={down!r}, up_block_types={up!r}")
        if bad:
            raise WeightsError(f"unsupported UNet2DConditionModel config: {', '.join(bad)}")
        kw = {f.name: d[f.name] for f in fields(cls) if d.get(f.name) is not None}
        kw["num_heads"] = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        if down:
            kw["cross_attn"] = tuple(cross)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()})


# diffusers config values that SD 1.x/2.x use and this module hard-codes (written out by to_json, checked on load).
FIXED = {"act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0, "downsample_padding": 1,
         "mid_block_type": "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1, "center_input_sample": False,
         "transformer_layers_per_block": 1, "only_cross_attention": False, "dual_cross_attention": False,
         "resnet_time_scale_shift": "default", "time_embedding_type": "positional", "attention_type": "default",
         "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embed_type": None, "num_class_embeds": None,
         "addition_embed_type": None, "encoder_hid_dim": None, "time_cond_proj_dim": None,
         "timestep_post_act": None, "time_embedding_dim": None, "cross_attention_norm": None,
         "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "dropout": 0.0}

PRESETS = {
    "sd15": UNetConfig(),
    "sd2": UNetConfig(num_heads=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                      upcast_attention=True, sample_size=96),  # 64-dim heads: 320/5 = 640/10 = 1280/20
    # CPU-sized; 4+ channels per group, as with one GroupNorm would cancel the per-channel timestep shift (t unseen).
    "tiny": UNetConfig(block_out_channels=(32, 64), cross_attn=(True, False), layers_per_block=1,
                       num_heads=2, cross_attention_dim=32, norm_num_groups=8, sample_size=32),
}


def infer_config(sd):
    """A UNetConfig from tensor shapes; head counts are not stored, so they come from the preset it matches."""
    try:
        n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("down_blocks."))
        ch = tuple(sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(n))
        cfg = UNetConfig(
            in_channels=sd["conv_in.weight"].shape[1], out_channels=sd["conv_out.weight"].shape[0],
            block_out_channels=ch,
            cross_attn=tuple(f"down_blocks.{i}.attentions.0.norm.weight" in sd for i in range(n)),
            layers_per_block=1 + max(int(k.split(".")[3]) for k in sd if k.startswith("down_blocks.0.resnets.")),
            cross_attention_dim=sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            use_linear_projection=sd["mid_block.attentions.0.proj_in.weight"].ndim == 2)
    except (KeyError, ValueError) as e:
        raise WeightsError(f"cannot infer a UNet config from these tensors (no {e}); is this a "
                           "UNet2DConditionModel?") from None
    shape = ("block_out_channels", "cross_attn", "layers_per_block", "cross_attention_dim", "use_linear_projection")
    for preset in PRESETS.values():
        if all(getattr(preset, f) == getattr(cfg, f) for f in shape):  # in/out channels do not change the heads
            return replace(preset, in_channels=cfg.in_channels, out_channels=cfg.out_channels)
    raise WeightsError(f"UNet with {ch} channels and {cfg.cross_attention_dim}-wide context matches no preset and "
                       "its head count is not stored in the weights: load it with its diffusers config.json "
                       "(unet/config.json of a diffusers folder, or beside a lone UNet file)")


def load_unet(path):
    """A UNet2DConditionModel safetensors file, or the folder holding it (config.json beside it is used if present)."""
    path = find_weights(path, ["diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors"])
    cfg = read_config(path)
    return UNet.from_state_dict(read_safetensors(path), UNetConfig.from_json(cfg) if cfg else None, source=str(path))
