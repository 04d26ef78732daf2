"""Each loss against a naive formula written out with loops; stop-gradients; DDP == one process."""
import math
import socket

import torch
import torch.multiprocessing as mp

from helpers import rel_err
from losses import is_loss, itc_loss, rsc_loss, snr, v_target


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
    # No rows selected: a zero that is still a tensor in the graph
    z = rsc_loss(torch.zeros(0, 8), torch.zeros(0, 8), t, ls)
    assert z.item() == 0 and z.requires_grad


# ---- DDP: 2 gloo processes == one process with the global batch ---------------------------------

class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, xg, c, sel):  # through DDP's forward, so DDP averages the gradients
        img, txt = self.img(x), self.txt(c)
        itc = itc_loss(img, txt, self.logit_scale)
        rsc = rsc_loss(img[sel], self.img(xg)[sel], txt, self.logit_scale)
        return itc, rsc


def global_batch():
    g = torch.Generator().manual_seed(1)
    # 8 samples; RSC rows: ranks select unequal numbers (rank 0: 3 of 4, rank 1: 1 of 4)
    return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g), \
        torch.tensor([1, 1, 0, 1, 0, 0, 1, 0], dtype=torch.bool)


def ddp_worker(rank, port, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    x, xg, c, sel = (a[rank * 4:(rank + 1) * 4] for a in global_batch())
    res = {}
    for name in ("itc", "rsc"):
        model.zero_grad()
        itc, rsc = model(x, xg, c, sel)
        loss = itc if name == "itc" else rsc
        loss.backward()
        res[name] = (loss.item(), {k: p.grad.tolist() for k, p in model.named_parameters()})  # no shared mem
        if name == "rsc":  # per-rank values differ; their mean is the global RSC
            v = torch.tensor(loss.item())
            dist.all_reduce(v)
            res[name] = (v.item() / 2, res[name][1])
    out.put((rank, res))
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_itc_rsc_equal_single_process():
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
    x, xg, c, sel = global_batch()
    for i, name in enumerate(("itc", "rsc")):
        model.zero_grad()
        loss = model(x, xg, c, sel)[i]
        loss.backward()
        ref_loss = loss.item()
        for rank in range(2):
            loss, grads = results[rank][name]
            assert abs(loss - ref_loss) < 1e-6, (name, rank, loss, ref_loss)
            for k, p in model.named_parameters():
                assert rel_err(torch.tensor(grads["module." + k]), p.grad) < 1e-5, (name, rank, k)
