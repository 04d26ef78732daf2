"""vae.py against diffusers' AutoencoderKL: same posterior, same decode, same files, same config.json."""
import json

import pytest
import torch
from diffusers import AutoencoderKL
from helpers import ckpt_check, perturb, rel_err, repo_imports

from vae import PRESETS, VAE, VAEConfig, load_vae
from weights import WeightsError, read_safetensors, save_safetensors

# diffusers' own constructor arguments (3 levels, groups of 2 channels) so the config.json mapping is tested too.
DIFFUSERS_KW = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    sample_size=32)


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(AutoencoderKL(**DIFFUSERS_KW)).eval()
    with torch.no_grad():
        ref.quant_conv.bias[5] += 60.0  # one logvar channel far above 20: the clamp must act as diffusers'
    path = tmp_path_factory.mktemp("sd") / "vae"
    ref.save_pretrained(path, safe_serialization=True)
    return ref, path


def images(h=18, w=14):  # sizes that are not multiples of 4: the asymmetric padding decides the output size
    torch.manual_seed(1)
    return torch.rand(2, 3, h, w) * 2 - 1


def check_same(ours, ref):
    x, z = images(), torch.randn(2, 4, 5, 4)
    with torch.no_grad():
        mean, logvar = ours.encode(x)
        dist = ref.encode(x).latent_dist
        assert rel_err(mean, dist.mean) <= 1e-5 and rel_err(logvar, dist.logvar) <= 1e-5
        assert logvar.max() == 20.0  # clamped like diffusers' DiagonalGaussianDistribution
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5


def test_parity_with_diffusers_files(ref_folder):
    ref, path = ref_folder
    for p in [path, path / "diffusion_pytorch_model.safetensors", path.parent]:
        ours = load_vae(p).eval()
        assert ours.cfg.norm_num_groups == 8 and ours.cfg.block_out_channels == (16, 32, 32)
        check_same(ours, ref)


@pytest.mark.parametrize("as_conv", [False, True])
def test_old_attention_key_names(ref_folder, tmp_path, as_conv):
    ref, path = ref_folder
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for k, v in read_safetensors(path / "diffusion_pytorch_model.safetensors").items():
        for a, b in new.items():
            if f"attentions.0.{a}." in k:
                k, v = k.replace(f".{a}.", f".{b}."), (v[:, :, None, None] if as_conv and v.ndim == 2 else v)
        sd[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in sd
    save_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    check_same(load_vae(tmp_path).eval(), ref)


def test_our_files_open_in_diffusers(tmp_path):
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    ours = perturb(VAE(cfg)).eval()
    save_safetensors(ours.state_dict(), tmp_path / "diffusion_pytorch_model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_json()))
    ref = AutoencoderKL.from_pretrained(tmp_path).eval()
    assert ref.config.scaling_factor == 0.18215
    x, z = images(16, 16), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert rel_err(ours.encode(x)[0], ref.encode(x).latent_dist.mean) <= 1e-5
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5
    assert VAEConfig.from_json(dict(ref.config)) == cfg
    assert VAEConfig.from_json(PRESETS["sd"].to_json()) == PRESETS["sd"]


def test_config_inferred_without_config_json(tmp_path):
    ours = perturb(VAE(PRESETS["tiny"]))
    save_safetensors(ours.state_dict(), tmp_path / "vae.safetensors")
    loaded = load_vae(tmp_path / "vae.safetensors")
    assert loaded.cfg == PRESETS["tiny"]
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), ours.state_dict().values()))


def test_loader_names_bad_tensors(tmp_path):
    sd = VAE(PRESETS["tiny"]).state_dict()
    del sd["decoder.up_blocks.0.upsamplers.0.conv.weight"]
    sd["encoder.extra.bias"] = torch.zeros(2)
    sd["quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    save_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as e:
        load_vae(tmp_path)
    msg = str(e.value)
    for name in ["decoder.up_blocks.0.upsamplers.0.conv.weight", "encoder.extra.bias",
                 "quant_conv.weight: file (8, 8, 3, 3), model (8, 8, 1, 1)"]:
        assert name in msg
    with pytest.raises(WeightsError, match="use_quant_conv"):
        VAEConfig.from_json({**PRESETS["sd"].to_json(), "use_quant_conv": False})


def test_grad_ckpt_same_grads():
    # The frozen decoder in RSC: eval mode, no parameter grads needed, gradients flow to the latents.
    torch.manual_seed(0)
    model = perturb(VAE(PRESETS["tiny"])).eval().requires_grad_(False)
    z = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3), requires_grad=True)
    def loss():
        z.grad = None
        return model.decode(z).square().mean()
    ckpt_check(model, loss, lambda: z.grad.clone())


def test_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    model = perturb(VAE(PRESETS["tiny"]))
    x = images(16, 16)
    with torch.no_grad():
        want = model.decode(model.encode(x)[0])
        model.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        assert rel_err(model.decode(model.encode(xc)[0]), want) <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode(model.encode(xc)[0])
    out.float().square().mean().backward()
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 0.05
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_copied_with_weights_py_only():
    """vae.py builds and runs with torch and einops alone; only its loaders use weights.py."""
    assert repo_imports("vae") == {"weights"}
