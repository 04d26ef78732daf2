"""lora.py: merged = base + (α/r) B A, step 0 = the base model, and our adapter file read by diffusers'
`load_lora_weights` (kohya's layout) giving the same UNet and text encoder as ours; each of its keys names a layer
under ComfyUI's and A1111's rules; kohya's target set covers more than the attention one."""
import re
from types import SimpleNamespace

import pytest
import torch

from helpers import perturb, rel_err
from clip import CLIP, PRESETS as CLIP_PRESETS
from lora import LoRA, TARGETS, add_lora, merged
from runs import save_lora
from single_file import to_single_file
from unet import PRESETS as UNET_PRESETS, Transformer, UNet
from unidiff import UniDiff
from weights import read_safetensors

PARTS = ["unet", "text", "vision"]


def adapted(rank=4, alpha=2.0, targets="attention"):
    """A perturbed tiny UniDiff with adapters on every part, B random (as trained: B = 0 would hide any bug)."""
    torch.manual_seed(0)
    m = perturb(UniDiff.tiny()).eval()
    m.lora = add_lora(m, PARTS, rank, alpha, torch.Generator().manual_seed(0), targets)
    with torch.no_grad():
        for a in m.lora.values():
            a.lora_up.weight.normal_(0, 0.3)
    return m


def inputs(m):
    torch.manual_seed(1)
    px = torch.rand(2, 3, 32, 32) * 2 - 1
    return px, m.tokenizer(["a red dress", "blue striped jeans"]), torch.randn(2, 4, 8, 8), torch.tensor([3, 700])


@torch.no_grad()
def outputs(m, px, ids, x, t):
    ctx = m.clip.text_hidden(ids)
    return dict(text=ctx, unet=m.unet(x, t, ctx), image=m.clip.encode_image(m.clip_pixels(px)))


# tiny: 4 UNet transformers (12 layers each in kohya's set, 8 attention ones) and 2 + 2 CLIP blocks (6 or 4)
COUNT = {"attention": 4 * 8 + 2 * 4 + 2 * 4, "kohya": 4 * 12 + 2 * 6 + 2 * 6}


@pytest.mark.parametrize("targets", ["attention", "kohya"])
@torch.no_grad()
def test_merged_model_equals_base_plus_adapters(targets):
    m = adapted(rank=4, alpha=2.0, targets=targets)
    keys = [list(net.state_dict()) for net in (m.unet, m.clip, m.vae)]
    assert keys == [list(net.state_dict()) for net in (UniDiff.tiny().unet, UniDiff.tiny().clip, UniDiff.tiny().vae)]
    assert {k.split("_")[1] for k in m.lora} == {"unet", "te", "clip"} and len(m.lora) == COUNT[targets]
    params = {n: p.clone() for n, p in m.named_parameters()}
    layers = {id(mod): n for n, mod in m.named_modules()}
    inp = inputs(m)
    hooked = outputs(m, *inp)
    with merged(m.lora) as base:
        for name, a in m.lora.items():
            w = params[layers[id(a.target[0])] + ".weight"].double()
            want = w + 2.0 / 4 * (a.lora_up.weight.double().flatten(1) @ a.lora_down.weight.double().flatten(1)
                                  ).view(w.shape)  # a 1x1 conv's: (out, in, 1, 1)
            assert torch.equal(base[name], w.float()) and rel_err(a.target[0].weight, want) < 1e-6
        plain = outputs(m, *inp)  # the adapters off, their update in the weights
    errs = {k: rel_err(plain[k], hooked[k]) for k in hooked}
    print("merged vs hooked:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert max(errs.values()) < 1e-5
    assert all(torch.equal(p, params[n]) for n, p in m.named_parameters())  # the base back, bit for bit
    again = outputs(m, *inp)
    assert all(torch.equal(again[k], hooked[k]) for k in hooked)  # and the adapters on again
    for a in m.lora.values():  # the adapters matter: without them the outputs move
        a.on = False
    base_out = outputs(m, *inp)
    assert min(rel_err(base_out[k], hooked[k]) for k in hooked) > 1e-2


def test_step_zero_is_the_base_model_and_only_B_learns_first():
    """B = 0 at init: the losses are the base model's, bit for bit; A's gradient is Bᵀ(...) = 0, B's is not."""
    torch.manual_seed(0)
    m = perturb(UniDiff.tiny())
    px, ids, _, _ = inputs(m)
    base = m.losses(px, ids, t_max=1000, generator=torch.Generator().manual_seed(3))
    m.lora = add_lora(m, PARTS, 4, 4.0, torch.Generator().manual_seed(0))
    out = m.losses(px, ids, t_max=1000, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(out[k], base[k]) for k in base) and base["rsc"] > 0
    out["total"].backward()
    for name, a in m.lora.items():
        assert a.target[0].weight.grad is None  # the adapted weight is frozen
        assert a.lora_down.weight.abs().min() > 0 and torch.count_nonzero(a.lora_down.weight.grad) == 0, name
        assert a.lora_up.weight.grad.abs().max() > 0, name


@pytest.mark.parametrize("targets", ["attention", "kohya"])
@torch.no_grad()
def test_diffusers_load_lora_weights_reads_our_file(tmp_path, targets):
    from diffusers import StableDiffusionPipeline
    m = adapted(rank=4, alpha=2.0, targets=targets)  # α/r = 0.5: a loader ignoring alpha would be 2x off
    m.save(tmp_path / "base")  # the base model: the adapters live outside its state_dict
    with merged(m.lora) as base:
        m.save(tmp_path / "ckpt")
        save_lora(m.lora, base, tmp_path / "ckpt")
    lora = read_safetensors(tmp_path / "ckpt" / "lora.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in lora
    vision = {"attention": 8, "kohya": 12}[targets]
    assert len(lora) == 3 * (COUNT[targets] - vision) and all(k.startswith(("lora_unet_", "lora_te_")) for k in lora)
    assert len(read_safetensors(tmp_path / "ckpt" / "lora_vision.safetensors")) == 3 * vision
    if targets == "kohya":  # the 1x1 convs' adapters in kohya's conv shapes; the MLP's and the feed-forward's there
        name = "lora_unet_down_blocks_0_attentions_0_proj_in"
        assert lora[f"{name}.lora_down.weight"].shape == (4, 32, 1, 1)
        assert lora[f"{name}.lora_up.weight"].shape == (32, 4, 1, 1)
        assert {"lora_te_text_model_encoder_layers_1_mlp_fc2.alpha",
                "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj.alpha"} <= lora.keys()

    px, ids, x, t = inputs(m)
    ours = outputs(m, px, ids, x, t)
    ctx = torch.randn(2, 77, 32)  # the UNet alone, on the same context for both
    ours["unet_ctx"] = m.unet(x, t, ctx)
    for folder, lora_file in ((tmp_path / "base", tmp_path / "ckpt" / "lora.safetensors"), (tmp_path / "ckpt", None)):
        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
        if lora_file is not None:
            before = pipe.unet(x, t, ctx).sample
            pipe.load_lora_weights(lora_file)
            assert rel_err(pipe.unet(x, t, ctx).sample, before) > 1e-2  # it loaded something that matters
        errs = dict(unet=rel_err(pipe.unet(x, t, ctx).sample, ours["unet_ctx"]),
                    text=rel_err(pipe.text_encoder(ids).last_hidden_state, ours["text"]))
        print(f"diffusers on {folder.name}{' + lora.safetensors' if lora_file else ''}:",
              {k: f"{v:.1e}" for k, v in errs.items()})
        assert max(errs.values()) < 1e-4


def comfyui_keys(unet, clip):
    """ComfyUI's rule, comfy/lora.py: model_lora_keys_unet maps "lora_unet_" + each diffusers UNet weight's key
    (comfy.utils.unet_to_diffusers, less ".weight", . -> _) to that weight in its model, "diffusion_model." + the
    original key; model_lora_keys_clip maps "lora_te_text_model_encoder_layers_{b}_{LORA_CLIP_MAP[c]}" to
    "...transformer.text_model.encoder.layers.{b}.{c}.weight" for c in LORA_CLIP_MAP (the attention projections
    and mlp.fc1/fc2), where that weight exists. -> {LoRA key: the original-layout weight it patches}."""
    clip_map = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                "self_attn.out_proj": "self_attn_out_proj"}
    sd = to_single_file(unet, SimpleNamespace(state_dict=dict, cfg=SimpleNamespace(
        block_out_channels=(), layers_per_block=0)), clip)  # no VAE: its keys are not looked at
    c = unet.cfg
    from single_file import rename, unet_names  # our diffusers -> original renaming, as unet_to_diffusers's inverse
    orig = rename({k: k for k in unet.state_dict()}, unet_names(len(c.block_out_channels), c.layers_per_block,
                                                                c.cross_attn), True)
    keys = {"lora_unet_" + d[:-len(".weight")].replace(".", "_"): "model.diffusion_model." + o
            for o, d in orig.items() if d.endswith(".weight")}
    for b in range(32):
        for k, v in clip_map.items():
            w = f"cond_stage_model.transformer.text_model.encoder.layers.{b}.{k}.weight"
            if w in sd:
                keys[f"lora_te_text_model_encoder_layers_{b}_{v}"] = w
    assert all(w in sd for w in keys.values())
    return keys


def a1111_module(key, L=2):
    """A1111's rule, extensions-builtin/Lora/networks.py convert_diffusers_name_to_compvis (the regexes for the
    transformer blocks and the text encoder): the kohya name -> the name of a module of the original-layout model
    (its named_modules, . -> _, assign_network_names_to_compvis_modules). A1111 writes SD's 3 = L + 1 blocks a level
    (L = 2 resnets); L is a parameter here so the tiny model (L = 1) checks the same rule."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_input_blocks_{1 + int(m[1]) * (L + 1) + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_unet_mid_block_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_middle_block_1_{m[2]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", key):
        return f"diffusion_model_output_blocks_{int(m[1]) * (L + 1) + int(m[2])}_1_{m[3]}"
    if m := re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key):
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    return key


def check_tool_keys(unet, clip, adapters):
    """Every key of lora.safetensors (UNet and text encoder: no SD tool loads CLIP's vision tower) names, under
    ComfyUI's and A1111's rules, a weight of the original SD layout of the shape its adapter's update has."""
    comfy = comfyui_keys(unet, clip)
    sd = to_single_file(unet, SimpleNamespace(state_dict=dict, cfg=SimpleNamespace(
        block_out_channels=(), layers_per_block=0)), clip)
    a1111 = {k[:-len(".weight")].replace("model.diffusion_model.", "diffusion_model.", 1)
             .replace("cond_stage_model.", "", 1).replace(".", "_"): v for k, v in sd.items() if k.endswith(".weight")}
    names = [k for k in adapters if not k.startswith("lora_clip_")]
    assert names
    for name in names:
        shape = adapters[name].target[0].weight.shape
        assert name in comfy and sd[comfy[name]].shape == shape, name
        assert a1111[a1111_module(name, unet.cfg.layers_per_block)].shape == shape, name


@pytest.mark.parametrize("targets", ["attention", "kohya"])
def test_every_key_maps_in_comfyui_and_a1111(tmp_path, targets):
    m = adapted(targets=targets)
    with merged(m.lora) as base:
        save_lora(m.lora, base, tmp_path)
    keys = {k.rsplit(".", 2 if k.endswith(".weight") else 1)[0] for k in read_safetensors(tmp_path / "lora.safetensors")}
    assert keys == {k for k in m.lora if not k.startswith("lora_clip_")}  # the file's names are the adapters'
    check_tool_keys(m.unet, m.clip, m.lora)


def coverage(unet, clip, targets):
    """(adapters, layers adapted, their weights' numbers, the adapters' numbers at rank 1) of the UNet and the text
    encoder."""
    adapters = add_lora(SimpleNamespace(unet=unet, clip=clip), ["unet", "text"], 1, 1.0, targets=targets)
    return adapters, len(adapters), sum(a.target[0].weight.numel() for a in adapters.values()), sum(
        p.numel() for p in adapters.parameters())


def kohya_rule(unet, clip):
    """sd-scripts networks/lora.py, create_network's defaults: in each Transformer2DModel (our Transformer) every
    nn.Linear and 1x1 nn.Conv2d; in each CLIPAttention and CLIPMLP of the text encoder every nn.Linear."""
    names = set()
    for prefix, net, kinds in (("lora_unet_", unet, (Transformer,)), ("lora_te_", clip.text_model, ())):
        for n, mod in net.named_modules():
            if isinstance(mod, kinds) or not kinds and n.endswith((".self_attn", ".mlp")):
                for c, layer in mod.named_modules():
                    if isinstance(layer, torch.nn.Linear) or isinstance(layer, torch.nn.Conv2d) and (
                            layer.kernel_size == (1, 1)):
                        names.add(prefix + ("" if kinds else "text_model_") + f"{n}.{c}".replace(".", "_"))
    return names


@pytest.mark.parametrize("model", ["tiny", "sd15"])
def test_kohya_targets_cover_more_than_attention(model):
    """kohya's set is sd-scripts' default rule exactly, a superset of the attention one; SD 1.5's on the meta device
    (no memory): 264 layers against 176, as sd-scripts counts, and its keys map in ComfyUI and A1111 too."""
    if model == "tiny":
        m = UniDiff.tiny()
        unet, clip = m.unet, m.clip
    else:
        with torch.device("meta"):
            unet, clip = UNet(UNET_PRESETS["sd15"]), CLIP(CLIP_PRESETS["vit-l/14"])
    att, n_att, w_att, r_att = coverage(unet, clip, "attention")
    koh, n_koh, w_koh, r_koh = coverage(unet, clip, "kohya")
    print(f"{model}: attention {n_att} layers, {w_att:,} weights, {r_att:,} adapter numbers per rank; kohya {n_koh} "
          f"layers, {w_koh:,} weights, {r_koh:,} per rank (attention: {w_att / w_koh:.0%}, {r_att / r_koh:.0%})")
    assert set(koh) == kohya_rule(unet, clip) and set(att) < set(koh) and w_att < w_koh
    assert {type(a.lora_down) for a in koh.values()} == {torch.nn.Linear, torch.nn.Conv2d}  # SD 1.x: 1x1 proj_in/out
    if model == "sd15":
        assert (n_att, n_koh) == (176, 264)
        check_tool_keys(unet, clip, koh)
    assert isinstance(next(iter(koh.values())), LoRA) and set(TARGETS) == {"attention", "kohya"}
