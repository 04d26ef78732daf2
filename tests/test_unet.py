"""unet.py against diffusers' UNet2DConditionModel: same outputs, same files, same config.json."""
import dataclasses
import json

import pytest
import torch
from diffusers import UNet2DConditionModel
from helpers import ckpt_check, perturb, rel_err, repo_imports

from unet import PRESETS, UNet, UNetConfig, load_unet
from weights import WeightsError, read_safetensors, save_safetensors

# Written as diffusers' own constructor arguments, so the config.json mapping is tested too.
SD1_STYLE = dict(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=2,
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32)
SD2_STYLE = dict(sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=24,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 attention_head_dim=(2, 4, 4), use_linear_projection=True, upcast_attention=True, norm_num_groups=16)


def inputs(ctx_dim, h=10, w=9):  # odd sizes: the upsamplers must follow the skips' sizes
    torch.manual_seed(1)
    return torch.randn(2, 4, h, w), torch.tensor([999, 3]), torch.randn(2, 7, ctx_dim)


@pytest.mark.parametrize("kw", [SD1_STYLE, SD2_STYLE], ids=["sd1-style", "sd2-style"])
def test_parity_with_diffusers_files(tmp_path, kw):
    torch.manual_seed(0)
    ref = perturb(UNet2DConditionModel(**kw)).eval()
    ref.save_pretrained(tmp_path / "unet", safe_serialization=True)
    x, t, ctx = inputs(kw["cross_attention_dim"])
    with torch.no_grad():
        want = ref(x, t, ctx).sample
        for path in [tmp_path / "unet", tmp_path / "unet" / "diffusion_pytorch_model.safetensors", tmp_path]:
            ours = load_unet(path)
            assert ours.cfg.use_linear_projection == kw.get("use_linear_projection", False)
            assert rel_err(ours(x, t, ctx), want) <= 1e-5, path
        # a scalar timestep is broadcast over the batch
        assert rel_err(ours(x, torch.tensor(500), ctx), ref(x, 500, ctx).sample) <= 1e-5


@pytest.mark.parametrize("cfg", [PRESETS["tiny"], UNetConfig(**{**vars(PRESETS["tiny"]), "num_heads": (2, 4),
                                                                "use_linear_projection": True, "norm_num_groups": 16})])
def test_our_files_open_in_diffusers(tmp_path, cfg):
    torch.manual_seed(0)
    ours = perturb(UNet(cfg)).eval()
    save_safetensors(ours.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    ref = UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, t, ctx = inputs(cfg.cross_attention_dim, 8, 8)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), ref(x, t, ctx).sample) <= 1e-5
    assert UNetConfig.from_json(dict(ref.config)) == cfg  # and diffusers' config reads back to ours


def test_config_inferred_without_config_json(tmp_path):
    ours = perturb(UNet(PRESETS["tiny"]))
    save_safetensors(ours.state_dict(), tmp_path / "unet.safetensors")
    loaded = load_unet(tmp_path / "unet.safetensors")
    assert loaded.cfg == PRESETS["tiny"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))
    odd = UNet(dataclasses.replace(PRESETS["tiny"], block_out_channels=(32, 96)))
    save_safetensors(odd.state_dict(), tmp_path / "odd.safetensors")
    with pytest.raises(WeightsError, match="config.json"):
        load_unet(tmp_path / "odd.safetensors")


def test_loader_names_bad_tensors(tmp_path):
    sd = UNet(PRESETS["tiny"]).state_dict()
    del sd["mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight"]
    sd["mid_block.attentions.0.extra.weight"] = torch.zeros(3)
    sd["conv_out.bias"] = torch.zeros(5)
    save_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["tiny"].to_json()))
    with pytest.raises(WeightsError) as e:
        load_unet(tmp_path)
    msg = str(e.value)
    for name in ["attn2.to_v.weight", "mid_block.attentions.0.extra.weight", "conv_out.bias: file (5,), model (4,)"]:
        assert name in msg
    assert read_safetensors(tmp_path / "diffusion_pytorch_model.safetensors")  # the file itself was readable


def test_unsupported_config_refused():
    d = PRESETS["sd15"].to_json()
    with pytest.raises(WeightsError, match="addition_embed_type"):
        UNetConfig.from_json({**d, "addition_embed_type": "text_time"})
    assert UNetConfig.from_json(d) == PRESETS["sd15"]
    assert UNetConfig.from_json(PRESETS["sd2"].to_json()) == PRESETS["sd2"]


def test_grad_ckpt_same_grads():
    torch.manual_seed(0)
    model = perturb(UNet(PRESETS["tiny"]))
    x, t, ctx = inputs(32, 8, 8)
    def loss():
        model.zero_grad()
        return model(x, t, ctx).square().mean()
    ckpt_check(model, loss, lambda: torch.cat([p.grad.flatten() for p in model.parameters()]))


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = perturb(UNet(PRESETS["tiny"]))
    x, t, ctx = inputs(32, 8, 8)
    with torch.no_grad():
        want = model(x, t, ctx)
        model.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        assert rel_err(model(xc, t, ctx), want) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(xc, t, ctx)
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_copied_with_weights_py_only():
    """unet.py builds and runs with torch and einops alone; only its loaders use weights.py."""
    assert repo_imports("unet") == {"weights"}
