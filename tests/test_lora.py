"""lora.py: merged = base + (α/r) B A, step 0 = the base model, and our adapter file read by diffusers'
`load_lora_weights` (kohya's layout) giving the same UNet and text encoder as ours."""
import torch

from helpers import perturb, rel_err
from lora import attention_lora, merged
from runs import save_lora
from unidiff import UniDiff
from weights import read_safetensors

PARTS = ["unet", "text", "vision"]


def adapted(rank=4, alpha=2.0):
    """A perturbed tiny UniDiff with adapters on every part, B random (as trained: B = 0 would hide any bug)."""
    torch.manual_seed(0)
    m = perturb(UniDiff.tiny()).eval()
    m.lora = attention_lora(m, PARTS, rank, alpha, torch.Generator().manual_seed(0))
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


@torch.no_grad()
def test_merged_model_equals_base_plus_adapters():
    m = adapted(rank=4, alpha=2.0)
    keys = [list(net.state_dict()) for net in (m.unet, m.clip, m.vae)]
    assert keys == [list(net.state_dict()) for net in (UniDiff.tiny().unet, UniDiff.tiny().clip, UniDiff.tiny().vae)]
    assert {k.split("_")[1] for k in m.lora} == {"unet", "te", "clip"} and len(m.lora) == 48  # 8 + 2 + 2 blocks × 4
    params = {n: p.clone() for n, p in m.named_parameters()}
    layers = {id(mod): n for n, mod in m.named_modules()}
    inp = inputs(m)
    hooked = outputs(m, *inp)
    with merged(m.lora) as base:
        for name, a in m.lora.items():
            w = params[layers[id(a.target[0])] + ".weight"].double()
            want = w + 2.0 / 4 * a.lora_up.weight.double() @ a.lora_down.weight.double()
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
    m.lora = attention_lora(m, PARTS, 4, 4.0, torch.Generator().manual_seed(0))
    out = m.losses(px, ids, t_max=1000, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(out[k], base[k]) for k in base) and base["rsc"] > 0
    out["total"].backward()
    for name, a in m.lora.items():
        assert a.target[0].weight.grad is None  # the adapted weight is frozen
        assert a.lora_down.weight.abs().min() > 0 and torch.count_nonzero(a.lora_down.weight.grad) == 0, name
        assert a.lora_up.weight.grad.abs().max() > 0, name


@torch.no_grad()
def test_diffusers_load_lora_weights_reads_our_file(tmp_path):
    from diffusers import StableDiffusionPipeline
    m = adapted(rank=4, alpha=2.0)  # α/r = 0.5: a loader ignoring alpha would be 2x off
    m.save(tmp_path / "base")  # the base model: the adapters live outside its state_dict
    with merged(m.lora) as base:
        m.save(tmp_path / "ckpt")
        save_lora(m.lora, base, tmp_path / "ckpt")
    lora = read_safetensors(tmp_path / "ckpt" / "lora.safetensors")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in lora
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha" in lora
    assert len(lora) == 3 * 40 and all(k.startswith(("lora_unet_", "lora_te_")) for k in lora)  # 3 tensors each
    assert len(read_safetensors(tmp_path / "ckpt" / "lora_vision.safetensors")) == 3 * 8

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
