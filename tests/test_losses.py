"""Each loss against a naive formula written out with loops; stop-gradients; fp32 logits under autocast;
DDP and gradient accumulation == one batch."""
import math
import socket

from contextlib import nullcontext

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import rel_err
from losses import (anchored_loss, gather, grad_times, is_loss, itc_loss, l2_sp_, relational_loss, rsc_feature_loss,
                    rsc_loss, snr, step_rows, v_target, world_size)


def naive_norm(x):
    return [[a / math.sqrt(sum(b * b for b in row)) for a in row] for row in x.tolist()]


def naive_logsoftmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(r - m) for r in row))
    return [r - lse for r in row]


def naive_logits(a, b, s):
    a, b = naive_norm(a), naive_norm(b)
    return [[s * sum(x * y for x, y in zip(ra, rb)) for rb in b] for ra in a]


def test_itc_equals_naive_formula():
    torch.manual_seed(0)
    img, txt, ls = torch.randn(5, 8), torch.randn(5, 8), torch.tensor(2.3)
    s = min(math.exp(2.3), 100)
    L = naive_logits(img, txt, s)
    i2t = -sum(naive_logsoftmax(L[i])[i] for i in range(5)) / 5
    t2i = -sum(naive_logsoftmax([L[j][i] for j in range(5)])[i] for i in range(5)) / 5
    assert abs(itc_loss(img, txt, ls).item() - (i2t + t2i) / 2) < 1e-5
    # logit scale is clamped at 100 (and then gets no gradient)
    ls = torch.tensor(5.0, requires_grad=True)
    L = naive_logits(img, txt, 100.0)
    i2t = -sum(naive_logsoftmax(L[i])[i] for i in range(5)) / 5
    t2i = -sum(naive_logsoftmax([L[j][i] for j in range(5)])[i] for i in range(5)) / 5
    loss = itc_loss(img, txt, ls)
    loss.backward()
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-5 and ls.grad.item() == 0


def test_is_loss_and_min_snr():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    per = [sum((p - t) ** 2 for p, t in zip(pb.flatten().tolist(), tb.flatten().tolist())) / 16
           for pb, tb in zip(pred, target)]
    assert abs(is_loss(pred, target).item() - sum(per) / 3) < 1e-6
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    ac = torch.cumprod(1 - betas, 0)
    t = torch.tensor([0, 400, 999])
    sn = snr(ac, t)
    for v_pred in (False, True):
        w = [min(x, 5.0) / (x + 1 if v_pred else x) for x in sn.tolist()]
        ref = sum(wi * pi for wi, pi in zip(w, per)) / 3
        assert abs(is_loss(pred, target, sn, 5.0, v_prediction=v_pred).item() - ref) < 1e-6
    # v = √ᾱ ε − √(1-ᾱ) z0, element by element
    z0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    v = v_target(z0, eps, ac, t)
    for b in range(3):
        a = ac[t[b]].item()
        assert torch.allclose(v[b], math.sqrt(a) * eps[b] - math.sqrt(1 - a) * z0[b], atol=1e-6)


def naive_rsc_terms(real, gen, txt, s):
    """(first, second) = mean_rows ½KL(P‖P̂), mean_rows ½KL(P̂‖P), as python floats."""
    lp = [naive_logsoftmax(r) for r in naive_logits(real, txt, s)]
    lq = [naive_logsoftmax(r) for r in naive_logits(gen, txt, s)]
    kl = lambda a, b: sum(math.exp(x) * (x - y) for x, y in zip(a, b))
    R = len(lp)
    return (sum(kl(a, b) for a, b in zip(lp, lq)) / R / 2, sum(kl(b, a) for a, b in zip(lp, lq)) / R / 2)


def test_rsc_equals_naive_formula_and_stop_gradients():
    torch.manual_seed(0)
    real, gen, txt = torch.randn(3, 8), torch.randn(3, 8), torch.randn(6, 8)
    first, second = naive_rsc_terms(real, gen, txt, math.exp(1.5))
    assert abs(rsc_loss(real, gen, txt, torch.tensor(1.5)).item() - (first + second)) < 1e-6

    # Gradients: real only through the 2nd term, gen only through the 1st (written with autograd
    # on independent leaves: term 1 with P a constant, term 2 with P̂ a constant).
    def leaves():
        return [x.clone().requires_grad_() for x in (real, gen, txt, torch.tensor(1.5))]
    r, g, t, ls = leaves()
    rsc_loss(r, g, t, ls).backward()

    def P(x, t, ls):
        return torch.softmax(ls.exp() * torch.nn.functional.normalize(x, dim=-1)
                             @ torch.nn.functional.normalize(t, dim=-1).T, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1).mean() / 2
    r1, g1, t1, ls1 = leaves()
    kl(P(real, txt, torch.tensor(1.5)), P(g1, t1, ls1)).backward()   # term 1: sg(P)
    r2, g2, t2, ls2 = leaves()
    kl(P(gen, txt, torch.tensor(1.5)), P(r2, t2, ls2)).backward()    # term 2: sg(P̂)
    assert torch.allclose(r.grad, r2.grad, atol=1e-6) and r.grad.abs().max() > 0
    assert torch.allclose(g.grad, g1.grad, atol=1e-6) and g.grad.abs().max() > 0
    assert torch.allclose(t.grad, t1.grad + t2.grad, atol=1e-6)
    assert torch.allclose(ls.grad, ls1.grad + ls2.grad, atol=1e-6)
    # One-way: the first term alone, the real image untouched
    r, g, t, ls = leaves()
    one = rsc_loss(r, g, t, ls, one_way=True)
    assert abs(one.item() - first) < 1e-6
    one.backward()
    assert r.grad is None and torch.allclose(g.grad, g1.grad, atol=1e-6)  # no gradient reaches the real image
    assert torch.allclose(t.grad, t1.grad, atol=1e-6) and torch.allclose(ls.grad, ls1.grad, atol=1e-6)
    # No rows selected: a zero that is still a tensor in the graph
    z = rsc_loss(torch.zeros(0, 8), torch.zeros(0, 8), t, ls)
    assert z.item() == 0 and z.requires_grad


def test_logits_in_fp32_under_bf16_autocast():
    """Under autocast CLIP's projections return bf16, and at s = 100 a bf16 logit is off by up to ±0.4 (bf16
    logits put RSC 18 % off here). The same bf16 values in, the fp32 losses out."""
    torch.manual_seed(0)
    img, txt = torch.randn(8, 16).bfloat16().float(), torch.randn(8, 16).bfloat16().float()
    gen = (img + 0.1 * torch.randn(8, 16)).bfloat16().float()  # near the real image: RSC near its optimum
    ls = torch.tensor(math.log(100.0))
    ref, ours = ([x.clone().requires_grad_() for x in (img, gen, txt)] for _ in range(2))
    ref_itc, ref_rsc = itc_loss(ref[0], ref[2], ls), rsc_loss(*ref, ls)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf = [x.bfloat16() for x in ours]
        itc, rsc = itc_loss(bf[0], bf[2], ls), rsc_loss(*bf, ls)
    assert itc.dtype == rsc.dtype == torch.float32
    assert rel_err(itc, ref_itc) < 1e-6 and rel_err(rsc, ref_rsc) < 1e-6
    rsc.backward(), ref_rsc.backward()
    for a, b in zip(ours, ref):  # the gradients only pass the bf16 cast back to the embeddings: 2⁻⁹ each
        assert rel_err(a.grad, b.grad) < 1e-2


# ---- DDP and gradient accumulation: the parts of a batch == the batch ----------------------------

class Towers(torch.nn.Module):
    """A linear image and text tower; ITC and RSC glued as UniDiff.losses glues them."""

    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, xg, c, sel, n_rows, cache=None, k=0):  # through DDP's forward, so DDP averages the gradients
        K = 1 if cache is None else len(cache["txt"])
        img, txt = self.img(x), step_rows(self.txt(c), cache and cache["txt"], k)
        itc = itc_loss(grad_times(step_rows(img, cache and cache["img"], k), K), grad_times(txt, K), self.logit_scale)
        rsc = rsc_loss(img[sel], self.img(xg)[sel], txt, self.logit_scale, n=n_rows / (world_size() * K))
        return itc, rsc

    @torch.no_grad()
    def cache(self, xs, cs):  # UniDiff.contrastive_cache
        return dict(img=[gather(self.img(x)) for x in xs], txt=[gather(self.txt(c)) for c in cs])


def global_batch():
    g = torch.Generator().manual_seed(1)
    # 8 samples; RSC rows unequal over ranks and micro-steps (e.g. 2 ranks: 3 of 4 and 1 of 4)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), \
        torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)


def parts(model, K):
    """ITC and RSC of global_batch() as this rank's K micro-steps, the gradient accumulated over them (mean), as
    train.py does -> {name: (loss, {param: grad})}, the loss the mean over micro-steps and ranks."""
    W, r = world_size(), dist.get_rank() if world_size() > 1 else 0
    batch = global_batch()
    b = len(batch[0]) // (W * K)
    mine = lambda a: [a[(k * W + r) * b:(k * W + r + 1) * b] for k in range(K)]  # global micro-batch k, rank-major
    x, xg, c, sel = map(mine, batch)
    res, net = {}, getattr(model, "module", model)
    for i, name in enumerate(("itc", "rsc")):
        model.zero_grad()
        cache = net.cache(x, c) if K > 1 else None
        loss = 0.0
        for k in range(K):
            with model.no_sync() if W > 1 and k < K - 1 else nullcontext():
                part = model(x[k], xg[k], c[k], sel[k], int(batch[3].sum()), cache, k)[i]
                (part / K).backward()
            loss += part.item() / K
        if W > 1:  # per-rank values: their mean is the loss
            v = torch.tensor(loss)
            dist.all_reduce(v)
            loss = v.item() / W
        res[name] = (loss, {n: p.grad.clone() for n, p in net.named_parameters()})
    return res


def ddp_worker(rank, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    res = {K: parts(model, K) for K in (1, 2)}
    out.put((rank, {K: {n: (v, {k: g.tolist() for k, g in grads.items()}) for n, (v, grads) in r.items()}
                    for K, r in res.items()}))  # lists: no shared memory between processes
    dist.barrier()  # neither rank tears its connection down while the other still uses it (gloo aborted, once)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def same(a, b, grads=None):
    """Equal (loss, grads) pairs: the loss to 1e-6, the gradients to 1e-5 of their largest entry."""
    assert abs(a[0] - b[0]) < 1e-6, (a[0], b[0])
    for k in grads or b[1]:
        assert rel_err(torch.as_tensor(a[1][k]), b[1][k]) < 1e-5, k


def test_ddp_and_accumulation_equal_one_batch():
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=ddp_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    torch.manual_seed(0)
    model = Towers()
    one = {K: parts(model, K) for K in (1, 2)}
    for K in (1, 2):  # 2 ranks (× K micro-steps) == 1 process (× K micro-steps)
        for rank in range(2):
            for name in ("itc", "rsc"):
                same(results[rank][K][name], one[K][name])
    # Accumulation: ITC is exact (every gradient, logit_scale's included: counted once, not K times)
    same(one[2]["itc"], one[1]["itc"])
    # RSC: the value and every gradient but the captions' are exact; theirs lack exactly the term from the
    # other micro-step's rows (written out here: each micro-step's captions against the other's rows).
    same(one[2]["rsc"], one[1]["rsc"], grads=["img.weight", "img.bias", "logit_scale"])
    x, xg, c, sel = global_batch()
    model.zero_grad()
    img, gen = model.img(x).detach(), model.img(xg).detach()
    for k in range(2):
        live = torch.arange(8) // 4 == k
        txt = torch.where(live[:, None], model.txt(c), model.txt(c).detach())
        rsc_loss(img[sel & ~live], gen[sel & ~live], txt, model.logit_scale.detach(), n=int(sel.sum())).backward()
    for name, p in [("txt.weight", model.txt.weight), ("txt.bias", model.txt.bias)]:
        lacking = one[1]["rsc"][1][name] - one[2]["rsc"][1][name]
        assert rel_err(lacking, p.grad) < 1e-5 and p.grad.abs().max() > 0.1 * one[1]["rsc"][1][name].abs().max()


def naive_kl(p, q):
    return sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)


def test_rsc_feature_equals_naive_formula_and_both_sides_learn():
    torch.manual_seed(0)
    real, gen = torch.randn(3, 8), torch.randn(3, 8)
    want = sum(1 - sum(x * y for x, y in zip(a, b)) for a, b in zip(naive_norm(real), naive_norm(gen))) / 3
    r, g = real.clone().requires_grad_(), gen.clone().requires_grad_()
    got = rsc_feature_loss(r, g)
    assert abs(got.item() - want) < 1e-6
    assert abs(rsc_feature_loss(real, gen, n=6).item() - want / 2) < 1e-6  # a part of a larger batch
    got.backward()
    assert r.grad.abs().max() > 0 and g.grad.abs().max() > 0  # reciprocal: both the real and the generated side


def test_relational_equals_naive_formula_and_stop_gradients():
    torch.manual_seed(0)
    a, b, tau = torch.randn(4, 8), torch.randn(4, 5), 0.1

    def S(x):  # row i: softmax over the other rows j != i of cos(x_i, x_j) / tau
        n = naive_norm(x)
        rows = []
        for i in range(len(n)):
            logits = [sum(u * v for u, v in zip(n[i], n[j])) / tau for j in range(len(n)) if j != i]
            rows.append([math.exp(l) for l in naive_logsoftmax(logits)])
        return rows
    Sa, Sb = S(a), S(b)
    want = sum(0.5 * naive_kl(p, q) + 0.5 * naive_kl(q, p) for p, q in zip(Sa, Sb)) / 4
    la, lb = a.clone().requires_grad_(), b.clone().requires_grad_()
    got = relational_loss(la, lb, tau)
    assert abs(got.item() - want) < 1e-5
    got.backward()
    # a learns only from ½ KL(sg(S_b) ‖ S_a), b only from ½ KL(sg(S_a) ‖ S_b)
    def P(x):
        x = torch.nn.functional.normalize(x, dim=-1)
        return torch.softmax((x @ x.T / tau).masked_fill(torch.eye(4, dtype=torch.bool), -1e4), -1)
    def kl(p, q):
        return (p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log())).sum(-1).mean() / 2
    a1 = a.clone().requires_grad_()
    kl(P(b), P(a1)).backward()
    b1 = b.clone().requires_grad_()
    kl(P(a), P(b1)).backward()
    assert torch.allclose(la.grad, a1.grad, atol=1e-5) and la.grad.abs().max() > 0
    assert torch.allclose(lb.grad, b1.grad, atol=1e-5) and lb.grad.abs().max() > 0
    z = relational_loss(la[:2], lb[:2])  # fewer than 3 rows: nothing to relate, still in the graph
    assert z.item() == 0 and z.requires_grad


def test_anchored_equals_naive_formula_and_only_the_live_side_learns():
    torch.manual_seed(0)
    img, txt, img0, txt0 = torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8), torch.randn(3, 8)
    L, L0 = naive_logits(img, txt, math.exp(1.5)), naive_logits(img0, txt0, math.exp(1.0))
    rows = lambda M: [[math.exp(v) for v in naive_logsoftmax(r)] for r in M]
    cols = lambda M: rows([list(c) for c in zip(*M)])
    want = 0.5 * (sum(naive_kl(p, q) for p, q in zip(rows(L0), rows(L))) / 3
                  + sum(naive_kl(p, q) for p, q in zip(cols(L0), cols(L))) / 3)
    leaves = [x.clone().requires_grad_() for x in (img, txt, torch.tensor(1.5), img0, txt0, torch.tensor(1.0))]
    got = anchored_loss(*leaves)
    assert abs(got.item() - want) < 1e-6
    got.backward()
    assert all(x.grad.abs().max() > 0 for x in leaves[:3])  # the live towers and logit scale learn
    assert anchored_loss(img, txt, torch.tensor(1.5), img, txt, torch.tensor(1.5)).item() < 1e-6  # 0 at the start


def test_l2_sp_adds_the_gradient_of_its_penalty():
    torch.manual_seed(0)
    p, p0, g = torch.randn(5, 3), torch.randn(5, 3), torch.randn(5, 3)
    x = p.clone().requires_grad_()
    (0.3 * (x - p0).pow(2).sum() + (x * g).sum()).backward()  # λ‖θ − θ₀‖² + a loss with gradient g
    y = p.clone().requires_grad_()
    y.grad = g.clone()
    frozen = torch.nn.Parameter(torch.randn(2))  # no gradient (a frozen or unused weight): left alone
    l2_sp_([y, frozen], [p0, torch.zeros(2)], 0.3)
    assert torch.allclose(y.grad, x.grad, atol=1e-6) and frozen.grad is None
