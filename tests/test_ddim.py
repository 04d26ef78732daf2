"""ddim_sample == a diffusers DDIMScheduler loop with classifier-free guidance (SD 1.5's scheduler config)."""
import pytest
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from helpers import rel_err
from unidiff import UniDiff, ddim_sample, sd_alphas_cumprod


SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            set_alpha_to_one=False, clip_sample=False, timestep_spacing="leading")


def diffusers_loop(unet, latents, context, uncond, steps, guidance, eta, generator, prediction_type):
    sched = DDIMScheduler(**SD15, prediction_type=prediction_type)
    sched.set_timesteps(steps)
    x = latents * sched.init_noise_sigma
    ctx = torch.cat([uncond.expand_as(context), context])
    for t in sched.timesteps:
        u, c = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
        x = sched.step(u + guidance * (c - u), t, x, eta=eta, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("steps,eta,pred", [(10, 0.0, "epsilon"), (7, 0.5, "epsilon"), (5, 0.0, "v_prediction")])
@torch.no_grad()
def test_ddim_equals_diffusers(steps, eta, pred):
    torch.manual_seed(0)
    ours = UniDiff.tiny().unet
    for p in ours.parameters():  # random weights, larger than the init so every layer matters
        p.add_(torch.randn_like(p) * 0.05)
    ref = UNet2DConditionModel.from_config({k: v for k, v in ours.cfg.to_json().items() if k != "_class_name"})
    ref.load_state_dict(ours.state_dict())
    assert torch.equal(sd_alphas_cumprod(), DDIMScheduler(**SD15).alphas_cumprod)
    latents = torch.randn(2, 4, 8, 8)
    context, uncond = torch.randn(2, 77, 32), torch.randn(1, 77, 32)
    got = ddim_sample(ours, latents, context, uncond, sd_alphas_cumprod(), steps, 7.5, eta,
                      torch.Generator().manual_seed(1), v_prediction=pred == "v_prediction")
    want = diffusers_loop(ref, latents, context, uncond, steps, 7.5, eta, torch.Generator().manual_seed(1), pred)
    err = rel_err(got, want)
    print(f"ddim steps={steps} eta={eta} {pred}: rel err {err:.2e}")
    assert err < 1e-4
    assert rel_err(got, latents) > 0.05  # it did something
