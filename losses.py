"""The three UniDiff losses (SPEC §2): ITC, IS and RSC. Pure functions of tensors.

Under DDP (torch.distributed initialised, world > 1) ITC and RSC see the *global* batch:
embeddings are gathered from every rank by `gather`, whose backward *sums* each gathered
slice's gradient over ranks back to the rank that owns it. Every rank then computes
the same global loss, so its local rows get world × their share of the gradient, and DDP's
gradient averaging (÷ world) gives exactly the single-process gradient on the global batch.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _Gather(torch.autograd.Function):
    """all_gather whose backward sums each slice's gradient over ranks and returns the own slice."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return torch.cat(out, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss touched our rows: add their gradients up
        return grad.chunk(dist.get_world_size(), 0)[dist.get_rank()]


def gather(x):
    """(b, D) on each rank -> (world·b, D), rank-major, differentiable (see module docstring)."""
    return x if world_size() == 1 else _Gather.apply(x)


def itc_loss(img_emb, txt_emb, logit_scale):
    """Image–text contrastive loss, CLIP's symmetric InfoNCE over the (global) batch.

        v = n(img_emb), u = n(txt_emb), s = min(exp(logit_scale), 100)
        L = s · v uᵀ                                  (B, B), row i: image i vs every caption
        ITC = ½ [CE(L, arange(B)) + CE(Lᵀ, arange(B))]

    Every rank computes this same global loss, so the labels are arange of the global batch.
    """
    v, u = F.normalize(gather(img_emb), dim=-1), F.normalize(gather(txt_emb), dim=-1)
    logits = logit_scale.exp().clamp(max=100) * v @ u.T  # (B, B)
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def snr(alphas_cumprod, t):
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) of timesteps t (B,)."""
    a = alphas_cumprod[t]
    return a / (1 - a)


def v_target(z0, noise, alphas_cumprod, t):
    """v-prediction target (SD 2.x): v = √ᾱ_t ε − √(1-ᾱ_t) z0."""
    a = alphas_cumprod[t].view(-1, *[1] * (z0.dim() - 1))
    return a.sqrt() * noise - (1 - a).sqrt() * z0


def is_loss(pred, target, snr=None, gamma=None, v_prediction=False):
    """Image-synthesis loss: the diffusion MSE, optionally min-SNR-γ weighted.

        IS = mean_b w_b · mean‖pred_b − target_b‖²
        w_b = 1                                  (no gamma)
        w_b = min(SNR_b, γ) / SNR_b              (ε-prediction; target = ε)
        w_b = min(SNR_b, γ) / (SNR_b + 1)        (v-prediction; target = v_target(...))

    The min-SNR-γ weights (Hang et al. 2023) down-weight the easy low-noise timesteps.
    """
    per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    if gamma is None:
        return per_sample.mean()
    w = snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)
    return (w * per_sample).mean()


def rsc_loss(real_emb, gen_emb, txt_emb, logit_scale):
    """Reciprocal semantic consistency over the R selected rows (the samples with t < t_max).

        v = n(real_emb) (R, D), v̂ = n(gen_emb) (R, D), u = n(txt_emb) (B, D): all captions
        P = softmax(s · v uᵀ), P̂ = softmax(s · v̂ uᵀ)   (R, B), rows sum to 1
        RSC = mean_rows [ ½ KL(sg(P) ‖ P̂) + ½ KL(sg(P̂) ‖ P) ],  KL(p‖q) = Σ_j p_j (log p_j − log q_j)

    sg = stop-gradient: the first term trains the generated image (and the captions) towards
    CLIP's reading of the real one, the second the real image (and the captions) towards the
    generated one. Under DDP the captions are the global batch and each rank returns
    world/R_global × its rows' sum, so DDP's averaging gives the mean over all selected rows.
    R may be 0 on a rank (still call it: the gathers are collective); then the loss is 0.
    """
    u = F.normalize(gather(txt_emb), dim=-1)
    s = logit_scale.exp().clamp(max=100)
    logp = F.log_softmax(s * F.normalize(real_emb, dim=-1) @ u.T, dim=-1)  # (R, B)
    logq = F.log_softmax(s * F.normalize(gen_emb, dim=-1) @ u.T, dim=-1)   # (R, B)
    p, q = logp.exp(), logq.exp()
    kl = (p.detach() * (logp.detach() - logq)).sum(-1) + (q.detach() * (logq.detach() - logp)).sum(-1)
    n_rows = kl.new_full((), float(len(kl)))  # a fill kernel, not a host-to-device copy
    if world_size() > 1:
        dist.all_reduce(n_rows)
    return 0.5 * kl.sum() * world_size() / n_rows.clamp(min=1)
