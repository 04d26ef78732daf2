"""The original single-file layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*) both
ways, with diffusers' own converters (diffusers.loaders.single_file_utils) as the independent oracle."""
import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from transformers import CLIPTextConfig, CLIPTextModel

from helpers import rel_err
from unet import PRESETS as UNET_PRESETS, UNet
from single_file import rename, to_single_file, unet_names, vae_attn_shape, vae_names
from unidiff import UniDiff
from vae import PRESETS as VAE_PRESETS, VAE
from weights import WeightsError, save_safetensors



def tagged(model):
    """Each tensor replaced by a tiny one holding its index (same ndim): checks where every tensor goes."""
    return {k: torch.full((1,) * p.ndim, float(i), device="cpu") for i, (k, p) in enumerate(model.state_dict().items())}


@pytest.mark.parametrize("preset", ["sd15", "sd2"])
def test_full_size_unet_names_match_diffusers_converter(preset):
    cfg = UNET_PRESETS[preset]
    with torch.device("meta"):
        ids = tagged(UNet(cfg))
    orig = rename(ids, unet_names(len(cfg.block_out_channels), cfg.layers_per_block, cfg.cross_attn), True)
    assert any(k.startswith("output_blocks.2.1.conv.") for k in orig)  # SD's first up level has no attention
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in orig.items()}, cfg.to_json())
    assert back.keys() == ids.keys() and all(torch.equal(back[k], ids[k]) for k in ids)


def test_full_size_vae_names_match_diffusers_converter():
    cfg = VAE_PRESETS["sd"]
    with torch.device("meta"):
        ids = tagged(VAE(cfg))
    orig = vae_attn_shape(rename(ids, vae_names(4, cfg.layers_per_block), True), conv=True)
    assert orig["encoder.mid.attn_1.q.weight"].ndim == 4 and "decoder.up.3.upsample.conv.weight" in orig
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in orig.items()}, cfg.to_json())
    assert back.keys() == ids.keys() and all(torch.equal(back[k], ids[k]) for k in ids)


def random_diffusers_models(model):
    """diffusers / transformers models with random weights and our tiny configs."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in model.unet.cfg.to_json().items() if k != "_class_name"})
    vae = AutoencoderKL.from_config({k: v for k, v in model.vae.cfg.to_json().items() if k != "_class_name"})
    t = model.clip.cfg.text
    text = CLIPTextModel(CLIPTextConfig(hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                                        num_hidden_layers=t.num_hidden_layers,
                                        num_attention_heads=t.num_attention_heads, projection_dim=32))
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.02)  # zero-initialised layers too
        m.eval()
    return unet, vae, text


@torch.no_grad()
def test_single_file_both_ways_and_outputs(tmp_path, caplog):
    """Our file converts back through diffusers' converters to the diffusers state dict we started from;
    loading it (with EMA keys, schedule buffers, no `text_model.` prefix) gives the diffusers models' outputs."""
    template = UniDiff.tiny()
    d_unet, d_vae, d_text = random_diffusers_models(template)
    unet = UNet.from_state_dict(d_unet.state_dict(), template.unet.cfg)
    vae = VAE.from_state_dict(d_vae.state_dict(), template.vae.cfg)
    single = to_single_file(unet, vae, template.clip)

    assert torch.equal(single["first_stage_model.decoder.mid.attn_1.proj_out.weight"][:, :, 0, 0],
                       d_vae.state_dict()["decoder.mid_block.attentions.0.to_out.0.weight"])
    for theirs, ours in ((convert_ldm_unet_checkpoint(single, unet.cfg.to_json()), d_unet.state_dict()),
                         (convert_ldm_vae_checkpoint(single, vae.cfg.to_json()), d_vae.state_dict())):
        assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    theirs, ours = convert_ldm_clip_checkpoint(single), template.clip.text_model.state_dict()
    assert theirs.keys() == {"text_model." + k for k in ours}
    assert all(torch.equal(theirs["text_model." + k], v) for k, v in ours.items())

    # An SD 1.x-style file: old text keys (no `text_model.`), EMA copies and schedule buffers alongside.
    file = {k: v for k, v in single.items() if not k.startswith("cond_stage_model.")}
    file |= {"cond_stage_model.transformer." + k.removeprefix("text_model."): v
             for k, v in d_text.state_dict().items()}
    file |= {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelconv_inweight": torch.zeros(3),
             "alphas_cumprod": torch.rand(1000), "betas": torch.rand(1000)}
    save_safetensors(file, tmp_path / "sd.safetensors")
    m = UniDiff.from_pretrained(tmp_path / "sd.safetensors")
    assert m.clip.vision_model is None and m.v_prediction is False  # no scheduler config in its header: SD 1.x's ε

    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    errs = dict(unet=rel_err(m.unet(x, t, ctx), d_unet(x, t, ctx).sample),
                decode=rel_err(m.vae.decode(x), d_vae.decode(x).sample))
    px = torch.rand(2, 3, 16, 16) * 2 - 1
    errs["encode"] = rel_err(m.vae.encode(px)[0], d_vae.encode(px).latent_dist.mean)
    ids = m.tokenizer(["a photo of a cat", "red dress"])
    errs["text"] = rel_err(m.clip.text_hidden(ids), d_text(ids).last_hidden_state)
    print("single-file parity:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-5

    # With a CLIP given, its text tower is the shared encoder: one log line says the two differ.
    clip_dir = tmp_path / "clip"
    template.clip.save(clip_dir)
    with caplog.at_level(logging.WARNING, logger="unidiff"):
        m2 = UniDiff.from_pretrained(tmp_path / "sd.safetensors", clip=clip_dir)
    assert m2.clip.vision_model is not None and "differs from the CLIP text tower" in caplog.text
    assert torch.equal(m2.clip.text_hidden(ids), template.clip.text_hidden(ids))
    assert torch.equal(m2.unet(x, t, ctx), m.unet(x, t, ctx))


@pytest.mark.parametrize("v_prediction", [False, True])
def test_single_file_keeps_the_scheduler_config(tmp_path, v_prediction):
    """A single file loaded alone came back ε: the demo's v-prediction model sampled 52/255 off, and
    --weights FILE would have trained it with the wrong objective. Its header now holds the scheduler config."""
    m = UniDiff.tiny(v_prediction=v_prediction)
    m.save(tmp_path, single_file=True)
    again = UniDiff.from_pretrained(tmp_path / "model_single_file.safetensors")
    assert again.v_prediction is v_prediction
    with safe_open(str(tmp_path / "model_single_file.safetensors"), "pt") as f:
        sched = json.loads(f.metadata()["scheduler_config"])
    assert sched == json.loads((tmp_path / "scheduler" / "scheduler_config.json").read_text())


def test_single_file_refusals(tmp_path):
    save_safetensors({"model.diffusion_model.x": torch.zeros(1), "cond_stage_model.model.y": torch.zeros(1)},
                     tmp_path / "sd2.safetensors")
    with pytest.raises(WeightsError, match="OpenCLIP"):
        UniDiff.from_pretrained(tmp_path / "sd2.safetensors")
    save_safetensors({"foo": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(WeightsError, match="not an SD 1.x single-file"):
        UniDiff.from_pretrained(tmp_path / "other.safetensors")
    (tmp_path / "v1-5.ckpt").write_bytes(b"never read")
    with pytest.raises(WeightsError, match="refused"):
        UniDiff.from_pretrained(tmp_path / "v1-5.ckpt")


def test_inpainting_unet_refused_at_construction(tmp_path):
    """A 9-channel UNet (latents + masked-image latents + mask) is named when the model is built, from a
    diffusers folder and from a single file alike, not by a shape error inside the first step."""
    m = UniDiff.tiny()
    unet9 = UNet(replace(m.unet.cfg, in_channels=9))
    msg = "this UNet takes 9 input channels and gives 4 \\(an inpainting model\\?\\).* 4 in and 4 out = the VAE's"
    with pytest.raises(WeightsError, match=msg):
        UniDiff(m.clip, unet9, m.vae)
    m.save(tmp_path / "inpaint")  # a diffusers folder whose unet/ is swapped for the inpainting one
    save_safetensors(unet9.state_dict(), tmp_path / "inpaint" / "unet" / "diffusion_pytorch_model.safetensors")
    (tmp_path / "inpaint" / "unet" / "config.json").write_text(json.dumps(unet9.cfg.to_json()))
    with pytest.raises(WeightsError, match=msg):
        UniDiff.from_pretrained(tmp_path / "inpaint")
    save_safetensors(to_single_file(unet9, m.vae, m.clip), tmp_path / "inpaint.safetensors")
    with pytest.raises(WeightsError, match=msg):  # its head count comes from the preset it matches
        UniDiff.from_pretrained(tmp_path / "inpaint.safetensors")
    with pytest.raises(WeightsError, match="takes 4 input channels and gives 8;"):
        UniDiff(m.clip, UNet(replace(m.unet.cfg, out_channels=8)), m.vae)


def test_unknown_single_file_unet_advice_is_true(tmp_path):
    """A single file stores no head count: the error points to the diffusers config.json, and that works."""
    t = UniDiff.tiny()
    m = UniDiff(t.clip, UNet(replace(t.unet.cfg, block_out_channels=(32, 96))), t.vae)  # matches no preset
    m.save(tmp_path / "odd", single_file=True)
    with pytest.raises(WeightsError, match=r"head count.*unet/config\.json of a diffusers folder"):
        UniDiff.from_pretrained(tmp_path / "odd" / "model_single_file.safetensors")
    assert UniDiff.from_pretrained(tmp_path / "odd").unet.cfg == m.unet.cfg
