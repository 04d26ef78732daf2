"""The three UniDiff losses, ITC, IS and RSC (README, "The losses"): pure functions of tensors. Then how ITC and
RSC see a batch larger than one rank's micro-batch.

DDP (world W > 1): `gather` concatenates every rank's embeddings; its backward sums each slice's gradient over the
ranks into the rank that owns it. Every rank computes the same global ITC, so its rows get W × their gradient, and
DDP's mean over ranks (÷ W) leaves the one-process gradient. RSC's rows stay on their rank, against all the
captions: each rank returns its part (rsc_loss's n), and the mean of the parts is the whole.

Gradient accumulation (K micro-steps, averaged) is gradient caching (docs/training.md): each micro-step puts its own
rows, with gradient, among the step's cached ones (`step_rows`), so ITC is the whole step's in every micro-step, and
`grad_times` scales the live rows' gradient by K against the loop's 1/K (logit_scale: K × 1/K of its whole
gradient). RSC's rows are each micro-step's part, as under DDP; left out: a caption's RSC gradient from the rows of
*other* micro-steps."""
from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F


def logits(a, b, logit_scale):
    """s · n(a) n(b)ᵀ in fp32 even under autocast: at s = 100 a bf16 logit is rounded by up to ±0.4."""
    dev = a.device.type  # (the meta device has no autocast to switch off)
    with torch.autocast(dev, enabled=False) if torch.amp.is_autocast_available(dev) else nullcontext():
        return logit_scale.exp().clamp(max=100) * F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def itc_loss(img_emb, txt_emb, logit_scale):
    """Image–text contrastive loss, CLIP's symmetric InfoNCE over the batch: img_emb, txt_emb (B, D), pair i
    in row i (under DDP or accumulation, the whole batch: see step_rows).

        v = n(img_emb), u = n(txt_emb), s = min(exp(logit_scale), 100)
        L = s · v uᵀ                                  (B, B), row i: image i vs every caption
        ITC = ½ [CE(L, arange(B)) + CE(Lᵀ, arange(B))]
    """
    L = logits(img_emb, txt_emb, logit_scale)  # (B, B), fp32
    labels = torch.arange(len(L), device=L.device)
    return (F.cross_entropy(L, labels) + F.cross_entropy(L.T, labels)) / 2


def snr(alphas_cumprod, t):
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


def rsc_loss(real_emb, gen_emb, txt_emb, logit_scale, n=None, one_way=False):
    """Reciprocal semantic consistency over R rows (the samples with t < t_max) against all the captions.

        v = n(real_emb) (R, D), v̂ = n(gen_emb) (R, D), u = n(txt_emb) (B, D): all captions
        P = softmax(s · v uᵀ), P̂ = softmax(s · v̂ uᵀ)   (R, B), rows sum to 1
        RSC = 1/n Σ_rows [ ½ KL(sg(P) ‖ P̂) + ½ KL(sg(P̂) ‖ P) ],  KL(p‖q) = Σ_j p_j (log p_j − log q_j)

    sg = stop-gradient: the first term trains the generated image (and the captions) towards CLIP's reading of the
    real one, the second the real one towards the generated; `one_way` keeps the first alone (an ablation). n: R by
    default; a part of a larger batch (a rank's, a micro-step's) passes the batch's rows ÷ the parts. R may be 0.
    """
    txt_emb = txt_emb.float()  # once: the two terms' gradients into it nearly cancel, so they add up in fp32
    logp = F.log_softmax(logits(real_emb, txt_emb, logit_scale), dim=-1)  # (R, B), fp32
    logq = F.log_softmax(logits(gen_emb, txt_emb, logit_scale), dim=-1)   # (R, B)
    p, q = logp.exp(), logq.exp()
    kl = (p.detach() * (logp.detach() - logq)).sum(-1)  # KL(sg(P) ‖ P̂): the generated image learns
    if not one_way:
        kl = kl + (q.detach() * (logq.detach() - logp)).sum(-1)  # KL(sg(P̂) ‖ P): the real image learns
    return 0.5 * kl.sum() / (n or len(kl) or 1)


# ---- other readings of RSC, and a remedy for forgetting (docs/results.md compares them) ----

def rsc_feature_loss(real_emb, gen_emb, n=None):
    """(b) feature consistency: RSC = 1/n Σ_rows (1 − cos(v, v̂)), real and generated embeddings (R, D), n as in
    rsc_loss; both sides learn."""
    cos = F.cosine_similarity(real_emb.float(), gen_emb.float(), dim=-1)  # (R,)
    return (1 - cos).sum() / (n or len(cos) or 1)


def relational_loss(a, b, tau=0.1):
    """(c) relational consistency: the rows' similarity structure in two feature spaces, a (R, Da) and b (R, Db),
    matched both ways: S = row softmax of n(x) n(x)ᵀ / τ without the diagonal (a row's distribution over the
    others), RSC = mean_rows ½ KL(sg(S_a) ‖ S_b) + ½ KL(sg(S_b) ‖ S_a). Fewer than 3 rows: 0 (nothing to relate)."""
    if len(a) < 3:
        return a.sum() * 0 + b.sum() * 0
    eye = torch.eye(len(a), dtype=torch.bool, device=a.device)
    logs = [F.log_softmax((F.normalize(x.float(), dim=-1) @ F.normalize(x.float(), dim=-1).T / tau)
                          .masked_fill(eye, -1e4), dim=-1) for x in (a, b)]  # (R, R) each; the diagonal's p is 0
    kl = lambda logp, logq: (logp.exp() * (logp - logq)).sum(-1).mean()  # KL(p ‖ q), mean over rows
    return 0.5 * kl(logs[0].detach(), logs[1]) + 0.5 * kl(logs[1].detach(), logs[0])


def anchored_loss(img_emb, txt_emb, logit_scale, img0, txt0, logit_scale0):
    """(d) anchored consistency (LwF, Li & Hoiem 2016): the live CLIP's caption distribution over the batch kept
    close to the frozen start's (img0, txt0, logit_scale0, no gradient), both ways like ITC:
        L = s · n(v) n(u)ᵀ, L₀ likewise from the start;  RSC = ½ [KL(P₀ ‖ P) over rows + over columns]"""
    L, L0 = logits(img_emb, txt_emb, logit_scale), logits(img0, txt0, logit_scale0)  # (B, B) each
    kl = lambda l0, l: F.kl_div(F.log_softmax(l, -1), F.log_softmax(l0, -1), log_target=True, reduction="batchmean")
    return 0.5 * (kl(L0, L) + kl(L0.T, L.T))


def l2_sp_(params, start, lam):
    """L2-SP (Li, Grandvalet & Davoine 2018): λ Σ‖θ − θ₀‖² pulls the trained weights towards the start's. Its
    gradient 2λ(θ − θ₀) is added to each .grad in place: exact, and no graph over every weight."""
    for p, p0 in zip(params, start) if lam else ():
        if p.grad is not None:
            p.grad.add_(p.detach() - p0, alpha=2 * lam)


# ---- a batch larger than one micro-batch on one rank (DDP, gradient accumulation) ----

def world_size():  # W, the number of DDP processes
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


def step_rows(x, cache=None, k=0):
    """This rank's rows x (b, D) -> the rows ITC and RSC contrast: gathered over ranks (W·b, D), and with a
    cache (the step's K micro-batches' rows without gradient, K × (W·b, D)) put in place k among them (K·W·b, D)."""
    x = gather(x)
    return x if cache is None else torch.cat([*cache[:k], x, *cache[k + 1:]])


def grad_times(x, k):
    """x, whose gradient is multiplied by k; its value stays x exactly (x - x.detach() is exactly 0)."""
    return x if k == 1 else x.detach() + k * (x - x.detach())
