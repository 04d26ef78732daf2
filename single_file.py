"""The original single-file SD layout (CompVis keys; what ComfyUI and A1111 read) <-> our diffusers names.

One table of (diffusers prefix, original prefix) pairs per model, used both ways: longest matching prefix wins."""
import json

from safetensors import safe_open

from clip import CLIP
from unet import UNet
from vae import VAE
from weights import WeightsError, read_safetensors

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_ATTN = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
# The header entry holding the scheduler config (JSON, as diffusers' scheduler_config.json): a single file has no
# folder beside it, and without it a v-prediction model would load as an ε one
SCHEDULER_KEY = "scheduler_config"


def unet_names(n, L, cross_attn):
    """n levels, L resnets per down level (L + 1 per up level), cross_attn per down level."""
    pairs = [("conv_in.", "input_blocks.0.0."), ("time_embedding.linear_1.", "time_embed.0."),
             ("time_embedding.linear_2.", "time_embed.2."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.attentions.0.", "middle_block.1.")]
    res = [("mid_block.resnets.0.", "middle_block.0."), ("mid_block.resnets.1.", "middle_block.2.")]
    up_attn = cross_attn[::-1]
    for b in range(n):
        for j in range(L):  # input_blocks: conv_in, then per level L x (resnet, attention), then a downsampler
            i = b * (L + 1) + 1 + j
            res.append((f"down_blocks.{b}.resnets.{j}.", f"input_blocks.{i}.0."))
            if cross_attn[b]:
                pairs.append((f"down_blocks.{b}.attentions.{j}.", f"input_blocks.{i}.1."))
        for j in range(L + 1):  # output_blocks: per level (L + 1) x (resnet, attention), upsampler in the last
            i = b * (L + 1) + j
            res.append((f"up_blocks.{b}.resnets.{j}.", f"output_blocks.{i}.0."))
            if up_attn[b]:
                pairs.append((f"up_blocks.{b}.attentions.{j}.", f"output_blocks.{i}.1."))
        if b < n - 1:
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (L + 1)}.0.op."))
            pairs.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{b * (L + 1) + L}.{1 + up_attn[b]}."))
    return pairs + [(d + a + ".", o + b + ".") for d, o in res for a, b in RESNET]


def vae_names(n, L):
    """n levels, L resnets per encoder level (L + 1 per decoder level); the decoder's up levels count backwards."""
    pairs = []
    for side in ("encoder.", "decoder."):
        pairs += [(side + "conv_norm_out.", side + "norm_out."), (side + "mid_block.resnets.0.", side + "mid.block_1."),
                  (side + "mid_block.resnets.1.", side + "mid.block_2.")]
        pairs += [(f"{side}mid_block.attentions.0.{a}.", f"{side}mid.attn_1.{b}.") for a, b in VAE_ATTN]
    for b in range(n):
        pairs += [(f"encoder.down_blocks.{b}.resnets.{j}.", f"encoder.down.{b}.block.{j}.") for j in range(L)]
        pairs += [(f"decoder.up_blocks.{b}.resnets.{j}.", f"decoder.up.{n - 1 - b}.block.{j}.") for j in range(L + 1)]
        if b < n - 1:
            pairs.append((f"encoder.down_blocks.{b}.downsamplers.0.", f"encoder.down.{b}.downsample."))
            pairs.append((f"decoder.up_blocks.{b}.upsamplers.0.", f"decoder.up.{n - 1 - b}.upsample."))
    return pairs + [(p + "conv_shortcut.", o + "nin_shortcut.") for p, o in pairs if ".resnets." in p]


def rename(sd, pairs, to_original):  # diffusers -> original names, or back
    table = dict(pairs if to_original else [(o, d) for d, o in pairs])
    out = {}
    for k, v in sd.items():
        p = max((p for p in table if k.startswith(p)), key=len, default="")
        out[table.get(p, "") + k[len(p):]] = v
    return out


def vae_attn_shape(sd, conv):
    """The VAE mid-block attention: 1x1 convs (C, C, 1, 1) in the original layout, Linear (C, C) in diffusers."""
    is_w = lambda k: ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) \
        or ".attentions.0.to_" in k and k.endswith("weight")
    return {k: (v[:, :, None, None] if conv else v.flatten(1)) if is_w(k) else v for k, v in sd.items()}


def to_single_file(unet, vae, clip):
    """One state dict in the original SD 1.x layout: model.diffusion_model, first_stage_model, cond_stage_model."""
    c = unet.cfg
    u = rename(unet.state_dict(), unet_names(len(c.block_out_channels), c.layers_per_block, c.cross_attn), True)
    v = rename(vae.state_dict(), vae_names(len(vae.cfg.block_out_channels), vae.cfg.layers_per_block), True)
    t = clip.text_model.state_dict()
    return {**{"model.diffusion_model." + k: x for k, x in u.items()},
            **{"first_stage_model." + k: x for k, x in vae_attn_shape(v, conv=True).items()},
            **{"cond_stage_model.transformer.text_model." + k: x for k, x in t.items()}}


def load_single_file(path):
    """An original-layout SD 1.x .safetensors -> (UNet, VAE, CLIP text encoder, scheduler config from the header,
    which UniDiff.save writes, else {}: SD 1.x is ε); EMA copies and buffers unread."""
    sd = read_safetensors(path)
    with safe_open(str(path), "pt") as f:
        sched = json.loads((f.metadata() or {}).get(SCHEDULER_KEY, "{}"))
    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise WeightsError("this single file has an OpenCLIP text encoder (SD 2.x): convert it to the diffusers "
                           "folder layout (diffusers' StableDiffusionPipeline.from_single_file(...).save_pretrained)")
    strip = lambda prefix: {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    u, v = strip("model.diffusion_model."), strip("first_stage_model.")
    t = strip("cond_stage_model.transformer.")  # with or without `text_model.`: CLIP takes both
    if not (u and v and t):
        raise WeightsError("not an SD 1.x single-file checkpoint: expected keys model.diffusion_model.*, "
                           f"first_stage_model.* and cond_stage_model.transformer.* (first keys: {list(sd)[:3]})")
    blocks = {int(k.split(".")[1]) for k in u if k.startswith("input_blocks.")}
    # the first downsampler ends the first level (none: one level)
    L = min((i for i in blocks if f"input_blocks.{i}.0.op.weight" in u), default=len(blocks)) - 1
    n = len(blocks) // (L + 1)
    cross = tuple(f"input_blocks.{b * (L + 1) + 1}.1.norm.weight" in u for b in range(n))
    vn = 1 + max(int(k.split(".")[2]) for k in v if k.startswith("encoder.down."))
    vL = 1 + max(int(k.split(".")[4]) for k in v if k.startswith("encoder.down.0.block."))
    return (UNet.from_state_dict(rename(u, unet_names(n, L, cross), False), source=str(path)),
            VAE.from_state_dict(vae_attn_shape(rename(v, vae_names(vn, vL), False), conv=False), source=str(path)),
            CLIP.from_state_dict(t, source=str(path)), sched)
