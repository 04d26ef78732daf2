"""UniDiff: the losses' glue against a recomputation with diffusers' scheduler, where gradients go,
save -> reload, the saved folder in diffusers / transformers, and a tiny model overfitting four pairs."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import assert_same_grads, rel_err
import unidiff
from losses import itc_loss, rsc_loss
from unidiff import UniDiff, clip_normalise



def pairs():
    """Four 32x32 images in [-1, 1] and their captions."""
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    px = torch.full((4, 3, 32, 32), -1.0)
    px[0, 0, 8:24, 8:24] = 1
    px[1, 2] = torch.where((yy - 16) ** 2 + (xx - 16) ** 2 < 100, 1.0, -1.0)
    px[2, 1] = torch.where((xx // 4) % 2 == 0, 1.0, -1.0)
    px[3, :2] = torch.where(((xx - 16).abs() < 3) | ((yy - 16).abs() < 3), 1.0, -1.0)
    return px, ["a red square", "a blue circle", "green stripes", "a yellow cross"]


def test_losses_match_recomputation_with_diffusers_scheduler():
    from diffusers import DDPMScheduler
    torch.manual_seed(0)
    m = UniDiff.tiny()
    with torch.no_grad():
        for p in m.clip.parameters():  # spread the embeddings so ITC/RSC are not at their uniform values
            p.add_(torch.randn_like(p) * 0.05)
        m.clip.logit_scale.fill_(4.6)  # s = 100: sharp P, P̂
    px, caps = pairs()
    ids = m.tokenizer(caps)
    out = m.losses(px, ids, p_uncond=0.5, generator=torch.Generator().manual_seed(0))

    # The same draws, in the documented order: the device generator's seed, t, caption dropout on the host;
    # then from the device generator the posterior sample and ε.
    g = torch.Generator().manual_seed(0)
    g_dev = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=g)))
    t = torch.randint(0, 1000, (4,), generator=g)
    drop = torch.rand(4, generator=g) < 0.5
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False)
    mean, logvar = m.vae.encode(px)
    z0 = 0.18215 * (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=g_dev))
    noise = torch.randn(z0.shape, generator=g_dev)
    assert drop.any() and not drop.all() and (t < 500).any() and not (t < 500).all()  # seed covers both cases
    cond = m.tokenizer([("" if d else c) for d, c in zip(drop, caps)])
    zt = sched.add_noise(z0, noise, t)
    eps = m.unet(zt, t, m.clip.text_hidden(cond))
    assert rel_err(out["is_"], F.mse_loss(eps, noise)) < 1e-5

    real_px = clip_normalise((px + 1) / 2)  # already CLIP's 32x32
    img, txt = m.clip.encode_image(real_px), m.clip.encode_text(ids)
    assert rel_err(out["itc"], itc_loss(img, txt, m.clip.logit_scale)) < 1e-5
    sel = (t < 500).nonzero()[:, 0]
    z0_hat = torch.cat([sched.step(eps[i:i + 1], t[i], zt[i:i + 1]).pred_original_sample for i in sel])
    x_hat = m.vae.decode(z0_hat / 0.18215)  # tiny VAE: 16x16 latents decode to CLIP's 32x32
    gen = m.clip.encode_image(clip_normalise((x_hat + 1) / 2))
    rsc = rsc_loss(img[sel], gen, txt, m.clip.logit_scale)
    assert rsc > 1e-3 and rel_err(out["rsc"], rsc) < 1e-4
    total = out["itc"] + out["is_"] + 0.1 * out["rsc"]
    assert rel_err(out["total"], total) < 1e-6



def test_rsc_reads_a_non_square_latent_as_clip_pixels_reads_the_real_image(monkeypatch):
    """CLIP reads the centre square of a portrait or landscape image, not a squashed one, and RSC's decode of ẑ0
    reads the same square of the latent: a generated image equal to the real one gives CLIP equal inputs."""
    torch.manual_seed(0)
    m = UniDiff.tiny()  # CLIP reads 32 px; the VAE's 2x down factor
    sf = m.vae.cfg.scaling_factor
    up = lambda z: F.interpolate(z, scale_factor=m.down, mode="nearest")
    monkeypatch.setattr(m.vae, "decode", lambda z: up(z[:, :3] * sf))  # a decoder that commutes with crops
    t = torch.tensor([100, 300])
    a = m.alphas_cumprod[t].view(-1, 1, 1, 1)
    for h, w in [(24, 16), (16, 24)]:  # latents of 32x48 (portrait) and 48x32 (landscape) images
        z = torch.randn(2, 4, h, w)  # ẑ0
        real = up(z[:, :3])  # (2, 3, 2h, 2w): the image that ẑ0 decodes to
        gen = m.one_step_images(a.sqrt() * z, torch.zeros_like(z), t, 32)  # ε̂ = 0: ẑ0 = z_t / √ᾱ = z
        assert rel_err(gen, m.clip_pixels(real)) < 1e-6
        top, left = (2 * h - 32) // 2, (2 * w - 32) // 2  # the centre square, already CLIP's 32 px: no resize
        assert torch.equal(m.clip_pixels(real), clip_normalise((real[..., top:top + 32, left:left + 32] + 1) / 2))


def test_sides_are_multiples_of_the_vae_and_unet_downsampling():
    from types import SimpleNamespace
    from runs import RunError, check_size
    from unet import PRESETS
    m = UniDiff.tiny()
    assert (m.down, m.multiple) == (2, 4)  # 2x in the VAE, then 2x more in the tiny UNet's 2 levels
    sd = SimpleNamespace(down=8, unet=SimpleNamespace(cfg=PRESETS["sd15"]))
    assert UniDiff.multiple.fget(sd) == 64  # SD: 8x in the VAE, 8x more in the UNet's 4 levels
    check_size(m, 16, 24)
    with pytest.raises(RunError, match=r"^18x24 px: this model needs width and height in multiples of 4 .*16x24$"):
        check_size(m, 18, 24)

def test_where_gradients_go_and_skipped_losses():
    torch.manual_seed(0)
    m = UniDiff.tiny()
    px, caps = pairs()
    ids = m.tokenizer(caps)
    # RSC alone: gradient reaches the UNet *through* the frozen decoder, and CLIP; never the VAE.
    out = m.losses(px, ids, lambda_itc=0, lambda_is=0, lambda_rsc=1.0, t_max=1000)
    out["total"].backward()
    assert out["itc"].item() == 0
    assert all(p.grad is None for p in m.vae.parameters())
    assert m.unet.conv_in.weight.grad.abs().max() > 0 and m.clip.vision_model.embeddings.patch_embedding.weight.grad \
        .abs().max() > 0
    # No sample below t_max: RSC is a zero tensor
    assert m.losses(px, ids, lambda_itc=0, lambda_rsc=1.0, t_max=0)["rsc"].item() == 0
    # λ_itc = λ_rsc = 0 is plain SD fine-tuning: no vision tower needed
    m.clip.vision_model = m.clip.visual_projection = None
    m.zero_grad()
    out = m.losses(px, ids, lambda_itc=0, lambda_rsc=0)
    out["total"].backward()
    assert out["total"].item() == out["is_"].item() > 0 and m.clip.text_model.embeddings.token_embedding.weight.grad \
        .abs().max() > 0
    # Caption dropout 1.0: the UNet sees the empty caption only (same draws as captions that are all "")
    g = lambda: torch.Generator().manual_seed(1)
    a = m.losses(px, ids, lambda_itc=0, lambda_rsc=0, p_uncond=1.0, generator=g())["is_"]
    b = m.losses(px, m.tokenizer([""] * 4), lambda_itc=0, lambda_rsc=0, p_uncond=0.0, generator=g())["is_"]
    assert torch.equal(a, b)


def test_grad_accum_contrasts_the_whole_batch(monkeypatch):
    """Gradient caching (train.py --grad-accum K): in K micro-steps, ITC's value and gradient are the whole
    batch's; RSC's value too, and its gradient but for the term left out, which is written out here."""
    torch.manual_seed(0)
    m = UniDiff.tiny()
    with torch.no_grad():
        for p in m.clip.parameters():  # spread the embeddings so ITC/RSC are not at their uniform values
            p.add_(torch.randn_like(p) * 0.05)
        m.clip.logit_scale.fill_(4.6)
    px, caps = pairs()
    ids = m.tokenizer(caps)

    def grads():
        g = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad()
        return g

    def micro_steps(K, seeds, **kw):  # as train.py runs them -> the K outputs; gradient (mean) accumulated
        micro = list(zip(px.chunk(K), ids.chunk(K)))
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        cache = m.contrastive_cache(micro, gens, kw["lambda_itc"], kw["lambda_rsc"], 500)
        return [m.losses(p, i, generator=g, cache=cache, micro_step=k, **kw)
                for k, ((p, i), g) in enumerate(zip(micro, gens))]

    itc = dict(lambda_itc=1.0, lambda_is=0, lambda_rsc=0)
    full = m.losses(px, ids, **itc)["itc"]
    full.backward()
    ref = grads()
    for K in (2, 4):
        outs = micro_steps(K, range(K), **itc)
        for o in outs:
            assert rel_err(o["itc"], full) < 1e-6  # every micro-step's ITC is the whole batch's
            (o["total"] / K).backward()
        assert_same_grads(grads(), ref)  # logit_scale's included: counted once, not K times

    # RSC in 2 micro-steps, with 2 and 1 rows (t < 500); the whole batch's RSC on the same draws is written from
    # what the micro-steps embedded.
    seen, rsc = [], unidiff.rsc_loss
    monkeypatch.setattr(unidiff, "rsc_loss", lambda real, gen, *a, **kw: seen.append((real, gen)) or
                        rsc(real, gen, *a, **kw))
    outs = micro_steps(2, (1, 2), lambda_itc=0, lambda_is=0, lambda_rsc=1.0)
    assert [len(r) for r, _ in seen] == [2, 1]
    real, gen = (torch.cat(x) for x in zip(*seen))
    full = rsc(real, gen, m.clip.encode_text(ids), m.clip.logit_scale)
    assert full > 1e-3 and rel_err((outs[0]["rsc"] + outs[1]["rsc"]) / 2, full) < 1e-5
    full.backward(retain_graph=True)
    ref = grads()
    for o in outs:
        (o["total"] / 2).backward()
    acc = grads()
    for k in range(2):  # left out: micro-step k's captions' gradient from the other micro-step's rows
        txt = m.clip.encode_text(ids)
        txt = torch.cat([txt[:2], txt[2:].detach()] if k == 0 else [txt[:2].detach(), txt[2:]])
        rsc(seen[1 - k][0].detach(), seen[1 - k][1].detach(), txt, m.clip.logit_scale.detach(), n=3).backward()
    left_out = grads()
    assert all(n.startswith(("clip.text_model.", "clip.text_projection.")) for n in left_out)
    assert max(g.abs().max() / ref[n].abs().max() for n, g in left_out.items()) > 0.1  # not a rounding
    # RSC's gradient is a difference of nearly equal terms (P - P̂): rounding alone moves it by ~1e-5 here
    assert_same_grads({n: acc[n] + left_out[n] if n in left_out else acc[n] for n in acc}, ref, rtol=1e-4)

def test_training_step_reads_nothing_back_from_the_device():
    """A host sync (`.item()`, `if tensor`, boolean indexing) stalls the GPU every step. On the meta device,
    which holds no values, each of those raises: so a step that runs there has none."""
    m = UniDiff.tiny()
    ids = m.tokenizer(["a red dress", "blue jeans", "a straw hat", "white shoes"]).to("meta")
    m.to("meta")
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, foreach=True)
    torch.manual_seed(0)
    anchor = UniDiff.tiny(seed=1).clip.to("meta").requires_grad_(False)
    for t_max, form in [(0, "kl"), (500, "kl"), (1000, "kl"), (500, "feature"), (500, "relational"),
                        (500, "anchored")]:  # RSC on none, some and all of the rows; each form
        out = m.losses(torch.empty(4, 3, 32, 32, device="meta"), ids, t_max=t_max, rsc_form=form, anchor=anchor)
        out["total"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    assert out["rsc"].device.type == "meta" and m.unet.conv_in.weight.device.type == "meta"


def test_compile_captures_each_network_whole():
    """`UniDiff.compile` (train.py --compile) traces every network into one graph (fullgraph: a graph break
    raises), forward and backward, and changes neither the losses, the gradients nor the state-dict keys.
    aot_eager traces as inductor does but skips its code generation, which takes minutes on a CPU."""
    import copy
    torch.manual_seed(0)
    m = UniDiff.tiny()
    c = copy.deepcopy(m)
    c.compile(fullgraph=True, backend="aot_eager")
    px, caps = pairs()
    ids = m.tokenizer(caps)
    for seed in (2, 7):  # RSC on 2 rows, then on 3: the decoder and vision tower see a new batch size
        outs = [model.losses(px, ids, t_max=400, generator=torch.Generator().manual_seed(seed)) for model in (m, c)]
        for o in outs:
            o["total"].backward()
        assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(m.parameters(), c.parameters()) if p.grad is not None)
        m.zero_grad(), c.zero_grad()
    assert list(c.state_dict()) == list(m.state_dict())


@torch.no_grad()
def test_save_reload_and_open_in_diffusers_transformers(tmp_path):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel
    torch.manual_seed(0)
    m = UniDiff.tiny()
    for p in m.parameters():
        p.add_(torch.randn_like(p) * 0.02)  # zero-initialised layers too
    m.save(tmp_path / "ckpt", single_file=True)

    for again in (UniDiff.from_pretrained(tmp_path / "ckpt"),
                  UniDiff.from_pretrained(tmp_path / "ckpt" / "model_single_file.safetensors",
                                          clip=tmp_path / "ckpt" / "clip")):
        a, b = m.state_dict(), again.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    px, caps = pairs()
    ids = m.tokenizer(caps)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    errs = dict(
        unet=rel_err(UNet2DConditionModel.from_pretrained(tmp_path / "ckpt/unet")(x, t, ctx).sample, m.unet(x, t, ctx)),
        vae=rel_err(AutoencoderKL.from_pretrained(tmp_path / "ckpt/vae").decode(x).sample, m.vae.decode(x)),
        text=rel_err(CLIPTextModel.from_pretrained(tmp_path / "ckpt/text_encoder")(ids).last_hidden_state,
                     m.clip.text_hidden(ids)))
    clip = CLIPModel.from_pretrained(tmp_path / "ckpt/clip")
    cpx = clip_normalise((px + 1) / 2)
    errs["clip_image"] = rel_err(clip.get_image_features(pixel_values=cpx).pooler_output, m.clip.encode_image(cpx))
    errs["clip_text"] = rel_err(clip.get_text_features(input_ids=ids).pooler_output, m.clip.encode_text(ids))

    # The whole pipeline: diffusers' StableDiffusionPipeline on our folder == our generate (DDIM + CFG)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "ckpt", safety_checker=None)
    ours = m.generate(caps[:2], steps=4, guidance=5.0, seed=7, height=32, width=32)
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(7))
    theirs = pipe(caps[:2], num_inference_steps=4, guidance_scale=5.0, latents=latents, height=32, width=32,
                  output_type="np").images
    theirs = (theirs * 255).round().astype(np.uint8)
    errs["pipeline_uint8_max_diff"] = float(np.abs(theirs.astype(int) - ours.numpy().astype(int)).max())
    print("saved-folder parity:", {k: f"{v:.1e}" for k, v in errs.items()})
    assert ours.shape == (2, 32, 32, 3) and ours.dtype == torch.uint8 and ours.float().std() > 1
    assert errs.pop("pipeline_uint8_max_diff") <= 1 and max(errs.values()) < 1e-5
    assert json.loads((tmp_path / "ckpt/scheduler/scheduler_config.json").read_text())["steps_offset"] == 1


def test_tiny_overfits_four_pairs():
    """Frozen VAE fitted to the images first (a random decoder is no image model), CLIP warmed up with ITC
    alone (a random tiny CLIP starts collapsed, so RSC starts at 0), then all three losses train together."""
    torch.manual_seed(0)
    m = UniDiff.tiny()
    px, caps = pairs()
    ids = m.tokenizer(caps)
    opt = torch.optim.AdamW(m.vae.decoder.parameters(), lr=3e-3, weight_decay=0)
    mean = m.vae.encode(px)[0].detach()
    for p in m.vae.decoder.parameters():
        p.requires_grad_(True)
    for _ in range(40):
        loss = (m.vae.decode(mean) - px).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    m.vae.requires_grad_(False)

    vis = [*m.clip.vision_model.parameters(), m.clip.visual_projection.weight]
    rest = [p for n, p in m.clip.named_parameters() if not n.startswith(("vision_model", "visual_projection"))]
    opt = torch.optim.AdamW([dict(params=vis, lr=1e-2), dict(params=rest, lr=1e-3)], weight_decay=0)
    for _ in range(80):
        loss = m.losses(px, ids, lambda_is=0, lambda_rsc=0)["total"]
        opt.zero_grad(), loss.backward(), opt.step()

    @torch.no_grad()
    def evaluate():  # the same t, ε and posterior draws every time: 4 fixed seeds
        outs = [m.losses(px, ids, p_uncond=0, generator=torch.Generator().manual_seed(s)) for s in range(4)]
        sim = m.clip.encode_image(clip_normalise((px + 1) / 2)) @ m.clip.encode_text(ids).T
        recall = (sim.argmax(1) == torch.arange(4)).float().mean().item()
        return {k: sum(o[k].item() for o in outs) / 4 for k in ("itc", "is_", "rsc")}, recall

    before, _ = evaluate()
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0)
    for _ in range(50):
        loss = m.losses(px, ids)["total"]  # default λ = 1, 1, 0.1, t_max = 500
        opt.zero_grad(), loss.backward(), opt.step()
    after, recall = evaluate()
    print("overfit:", {k: f"{before[k]:.3f} -> {after[k]:.3f}" for k in before}, "recall", recall)
    assert before["rsc"] > 0.1 and all(after[k] < 0.8 * before[k] for k in before) and recall == 1.0


def test_cached_images_give_the_same_losses_and_gradients():
    """train.py --cache-latents: a step on Encoded images (UniDiff.encode, made once) is the step on their pixels
    with the same draws: each loss and gradient, RSC on every row, two micro-steps with the contrastive cache,
    non-square images (CLIP's view is their centre square)."""
    torch.manual_seed(0)
    m = UniDiff.tiny()
    with torch.no_grad():
        for p in m.clip.parameters():  # spread the embeddings so ITC/RSC are not at their uniform values
            p.add_(torch.randn_like(p) * 0.05)
    px = torch.rand(4, 3, 32, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = m.tokenizer(["a red dress", "blue jeans", "a straw hat", "white shoes"])

    def step(micro):  # as train.py runs a step of 2 micro-steps -> (each micro-step's losses, the gradients)
        gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
        cache = m.contrastive_cache(micro, gens, 1.0, 1.0, 1000)
        outs = [m.losses(x, i, generator=g, cache=cache, micro_step=k, t_max=1000, lambda_rsc=1.0)
                for k, ((x, i), g) in enumerate(zip(micro, gens))]
        for o in outs:
            (o["total"] / 2).backward()
        grads = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
        m.zero_grad()
        return torch.stack([torch.stack(list(o.values())) for o in outs]).detach(), grads

    pixels = list(zip(px.chunk(2), ids.chunk(2)))
    losses, grads = step(pixels)
    encoded = [(m.encode(x), i) for x, i in pixels]
    assert isinstance(encoded[0][0], unidiff.Encoded) and encoded[0][0].clip.shape == (2, 3, 32, 32)
    cached_losses, cached_grads = step(encoded)
    assert (losses[:, :3] > 1e-3).all()  # itc, is, rsc: each really computed
    assert rel_err(cached_losses, losses) < 1e-6
    assert {n.split(".")[0] for n in grads} == {"clip", "unet"}
    assert_same_grads(cached_grads, grads, rtol=1e-6)


def test_where_each_rsc_form_and_remedy_sends_gradient():
    """Each RSC form alone (λ_itc = λ_is = 0), and IS without text gradient: which parts get a gradient."""
    torch.manual_seed(0)
    m = UniDiff.tiny()
    px, caps = pairs()
    ids = m.tokenizer(caps)
    start = UniDiff.tiny(seed=1).clip.requires_grad_(False)  # another CLIP stands for the start (the same gives 0)
    got = lambda p: p.grad is not None and p.grad.abs().max() > 0
    parts = lambda: dict(unet_in=m.unet.conv_in.weight, unet_out=m.unet.conv_out.weight,
                         vision=m.clip.vision_model.embeddings.patch_embedding.weight,
                         text=m.clip.text_model.embeddings.token_embedding.weight)
    want = {  # feature: through the decoder into the whole UNet; relational: the UNet up to its mid-block (and the
              # text through its cross-attention), not its up path; anchored: CLIP alone
        "feature": dict(unet_in=True, unet_out=True, vision=True, text=True),
        "relational": dict(unet_in=True, unet_out=False, vision=True, text=True),
        "anchored": dict(unet_in=False, unet_out=False, vision=True, text=True),
    }
    for form, expect in want.items():
        m.zero_grad(set_to_none=True)
        out = m.losses(px, ids, lambda_itc=0, lambda_is=0, lambda_rsc=1.0, t_max=1000, rsc_form=form, anchor=start)
        out["total"].backward()
        assert out["rsc"].item() > 0, form
        assert {k: got(p) for k, p in parts().items()} == expect, form
        assert all(p.grad is None for p in m.vae.parameters()) and all(p.grad is None for p in start.parameters())
    # IS without gradient into the shared text tower: the UNet learns, the text tower does not
    m.zero_grad(set_to_none=True)
    m.losses(px, ids, lambda_itc=0, lambda_rsc=0, is_detach_text=True)["total"].backward()
    assert got(m.unet.conv_in.weight) and not got(m.clip.text_model.embeddings.token_embedding.weight)
