"""The paper's table for a run: retrieval, CLIP score, Fréchet distance, semantic collapse.

    python eval.py --ckpt runs/demo                  # the run's latest checkpoint, on its own data
    python eval.py --ckpt runs/fashion_woman/step_001000 --data fashion_woman

The model the run started from ("pretrained") and the checkpoint side by side, on the test split (see data.py).
CLIP score and FD are judged by the *pretrained* CLIP, so a run cannot raise its own score by bending its CLIP.
"""
import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data import TEST_FRACTION, DataError, open_dataset, parse_res, res_name
from runs import RunError, autocast, check_size, latest_checkpoint, load_model, load_start, read_state
from weights import WeightsError

SAMPLE = dict(n=8, steps=25, guidance=5.0)  # the validation grid: 8 test captions, 25 DDIM steps


@torch.no_grad()
def embed_images(model, pixels, batch=64):
    """L2-normalised CLIP image embeddings (N, D), float32 on the CPU."""
    dev = next(model.parameters()).device
    out = [model.image_embeddings(pixels[i:i + batch].to(dev)) for i in range(0, len(pixels), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.no_grad()
def embed_texts(model, captions, batch=256):
    dev = next(model.parameters()).device
    out = [model.text_embeddings(model.tokenizer(captions[i:i + batch]).to(dev)) for i in range(0, len(captions), batch)]
    return F.normalize(torch.cat(out).float(), dim=-1).cpu()


@torch.no_grad()
def embed(model, dataset, batch=64):
    """(image embeddings, text embeddings) of every pair in `dataset`, normalised, (N, D) each."""
    imgs, caps = [], []
    for pixels, captions in DataLoader(dataset, batch_size=batch):
        imgs.append(embed_images(model, pixels, batch))
        caps += captions
    return torch.cat(imgs), embed_texts(model, caps)


def retrieval(img, txt, captions):
    """Recall@1/5/10 (%) both ways for normalised embeddings; correct = the same caption text."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])
    correct = label[:, None] == label[None, :]  # (N, N): image i matches caption j
    sim = img @ txt.T  # (N images, N captions)
    out = {}
    for name, s, c in (("i2t", sim, correct), ("t2i", sim.T, correct.T)):
        order = s.argsort(dim=1, descending=True)
        hit = c.gather(1, order)  # (N, N): is the k-th retrieved item correct
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100 * hit[:, :k].any(1).float().mean().item()
    out["chance_r1"] = 100 * correct.float().mean().item()
    return out


def clip_score(img, txt):
    """Mean of 100 · max(cos(E_I(image), E_T(prompt)), 0), from the judge's normalised embeddings (N, D)."""
    return (100 * (img * txt).sum(-1).clamp(min=0)).mean().item()


def frechet(a, b):
    """FID's formula on features a (N, D), b (M, D): ‖μa − μb‖² + tr Σa + tr Σb − 2 tr (Σa^½ Σb Σa^½)^½, float64."""
    # Biased upward for few images: compare runs at equal --n only.
    a, b = a.double(), b.double()
    mu_a, mu_b, ca, cb = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(ca)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp(min=0).sqrt().sum()
    return ((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross).item()


def collapse(img):
    """Mean pairwise cosine (off the diagonal) of normalised embeddings (N, D)."""
    n = len(img)
    return ((img @ img.T).sum() - n).item() / (n * (n - 1))


def rankme(img):
    """Effective rank (RankMe, Garrido et al. 2023): exp of the entropy of the normalised singular values of (N, D)."""
    s = torch.linalg.svdvals(img.double())
    p = s / s.sum() + 1e-12
    return (-(p * p.log()).sum()).exp().item()


def uniformity(img):
    """log mean exp(−2 ‖x_i − x_j‖²) over pairs i ≠ j (Wang & Isola 2020): lower is more uniform on the sphere."""
    d2 = torch.cdist(img.double(), img.double()).pow(2)
    off = ~torch.eye(len(img), dtype=torch.bool)
    return torch.logsumexp(-2 * d2[off], 0).item() - math.log(off.sum().item())


@torch.no_grad()
def generate(model, prompts, steps, guidance, seed, res, batch):
    """uint8 (N, H, W, 3) images of `prompts` at `res` (512 or "512x768"), `batch` at a time."""
    W, H = parse_res(res)
    out = [model.generate(prompts[i:i + batch], steps=steps, guidance=guidance, seed=seed + i, height=H, width=W)
           for i in range(0, len(prompts), batch)]
    return torch.cat(out)


def evaluate(model, judge, test_set, args):
    """One column of the table."""
    img, txt = embed(model, test_set)
    row = retrieval(img, txt, test_set.captions)
    n = min(args.n, len(test_set))
    prompts = test_set.captions[:n]
    gen = generate(model, prompts, args.steps, args.guidance, args.seed, args.res, args.batch)
    real = torch.stack([test_set[i][0] for i in range(n)])
    gen_feat = embed_images(judge, gen.permute(0, 3, 1, 2).float() / 127.5 - 1)
    row["clip_score"] = clip_score(gen_feat, embed_texts(judge, prompts))
    row["fd"] = frechet(gen_feat, embed_images(judge, real))
    row["collapse"], row["rankme"], row["uniformity"] = collapse(img), rankme(img), uniformity(img)
    return row


ROWS = [("I→T R@1", "i2t_r1", "{:.1f}"), ("I→T R@5", "i2t_r5", "{:.1f}"), ("I→T R@10", "i2t_r10", "{:.1f}"),
        ("T→I R@1", "t2i_r1", "{:.1f}"), ("T→I R@5", "t2i_r5", "{:.1f}"), ("T→I R@10", "t2i_r10", "{:.1f}"),
        ("CLIP score ↑", "clip_score", "{:.2f}"), ("FD (CLIP features) ↓", "fd", "{:.4g}"),
        ("collapse: mean pairwise cos ↓", "collapse", "{:.3f}"), ("collapse: RankMe (effective rank) ↑", "rankme", "{:.1f}"),
        ("collapse: uniformity ↓", "uniformity", "{:.2f}")]


def table(columns):
    """columns: {header: row dict} -> a Markdown table."""
    rows = [f"| {name} | " + " | ".join(f.format(c[key]) for c in columns.values()) + " |" for name, key, f in ROWS]
    return "\n".join(["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|", *rows])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a run against the model it started from (Markdown table).")
    p.add_argument("--ckpt", required=True, help="a run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--data", help="a preset or folder (default: the run's --data); its test split is used: the rows "
                   f"metadata marks test, else a seeded {TEST_FRACTION:.0%}% of the groups (see data.py)")
    p.add_argument("--n", type=int, default=100, help="images generated for CLIP score and FD, at least 2 (default 100)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--res", help="generation and data resolution, WIDTHxHEIGHT or one number for a square "
                   "(default: the run's --res)")
    p.add_argument("--batch", type=int, default=16, help="images generated per batch (default 16)")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--weights", choices=["ema", "live"], help="the EMA or the trained weights (default: EMA if any)")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error(f"--n {args.n}: FD fits a covariance to the generated images, which needs at least 2")
    if not 1 <= args.steps <= 1000:  # DDIM strides over SD's 1000 training timesteps
        p.error(f"--steps {args.steps}: DDIM steps, from 1 to 1000 (the schedule's timesteps)")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: images generated per batch, at least 1")
    if args.res is not None:
        try:
            args.res = res_name(parse_res(args.res))
        except ValueError as e:
            p.error(f"--res: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        ckpt = latest_checkpoint(args.ckpt)
        run_args = read_state(ckpt)["args"]
        args.data, args.res = args.data or run_args["data"], args.res or run_args["res"]
        test_set = open_dataset(args.data, "test", args.res)
        if len(test_set) < 2:
            raise DataError(f"{args.data}: the test split has {len(test_set)} pair; FD and collapse need at least 2 "
                            "(a covariance, a pair of images): mark more rows \"split\": \"test\" in metadata.jsonl")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        start, judge_name = load_start(ckpt.parent)
        model, _, weights = load_model(ckpt, args.weights)
        check_size(model, *parse_res(args.res))
        start.to(device).eval()
        model.to(device).eval()
        print(f"evaluating {ckpt} ({weights} weights) on {args.data} (test split, {len(test_set)} pairs; "
              f"{min(args.n, len(test_set))} generated at {args.res} px, {args.steps} DDIM steps, guidance "
              f"{args.guidance})", file=sys.stderr)
        with autocast(device):
            columns = {"pretrained": evaluate(start, start, test_set, args),
                       f"run ({ckpt.name})": evaluate(model, start, test_set, args)}
    except (DataError, WeightsError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = (table(columns) + f"\n\nCLIP score and FD judged by the pretrained CLIP: {judge_name}. "
            f"Retrieval and collapse use each model's own CLIP; test split of {args.data} ({len(test_set)} pairs).")
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
