"""The claim in miniature: fine-tune the shipped pretrained tiny UniDiff on the demo's narrow domain with
each combination of the losses, and measure what each does in the domain, out of it (forgetting), to the
embedding space (collapse) and to generation (read by a frozen judge).

    python -m tools.ablation --plot assets/ablation.png          # the protocol in docs/results.md (test splits)
    python -m tools.ablation --split val --arms ITC+IS --seeds 0 --lr-clip 1e-4   # choosing it: validation only

Each arm is `train.py --data demo` with its loss weights, the same data, steps, learning rates and seeds;
"pretrained" is the start model itself. Retrieval is measured every --every steps (a curve over steps),
everything else at the end. Writes OUT/results.json (every figure of every run), OUT/results.md (mean ±
std over seeds) and a plot.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

import train
from config import defaults
from data import open_dataset
from eval import (SAMPLE, clip_score, collapse, embed, embed_images, embed_texts, frechet, generate, rankme, retrieval,
                  uniformity)
from runs import checkpoints, load_model, read_state
from tools.judge import load_judge
from unidiff import UniDiff

# λ_itc, λ_is, λ_rsc and RSC's variant per arm; the rest of the fine-tune is the demo's (config.py DEMO).
ARMS = {
    "pretrained": None,
    "ITC": dict(lambda_itc=1, lambda_is=0, lambda_rsc=0),
    "IS": dict(lambda_itc=0, lambda_is=1, lambda_rsc=0),
    "ITC+IS": dict(lambda_itc=1, lambda_is=1, lambda_rsc=0),
    "ITC+IS+RSC": dict(lambda_itc=1, lambda_is=1, lambda_rsc=0.1),
    "ITC+IS+RSC one-way": dict(lambda_itc=1, lambda_is=1, lambda_rsc=0.1, rsc_one_way=True),
    "ITC+IS+RSC λ=1": dict(lambda_itc=1, lambda_is=1, lambda_rsc=1.0),
}


def fine_tune(arm, seed, args):
    """Run train.py for one arm and seed -> its run folder. A run already there with the same flags is reused
    when complete and continued (--resume) when cut off, so the ablation can be stopped and started again."""
    out = Path(args.out) / "runs" / arm.replace(" ", "_") / f"seed{seed}"
    flags = ["--data", "demo", "--out", str(out), "--seed", str(seed), "--steps", str(args.steps),
             "--save-every", str(args.every), "--eval-every", "0", "--lr-unet", str(args.lr_unet),
             "--lr-clip", str(args.lr_clip)] + (["--train-size", str(args.train_size)] if args.train_size else [])
    for k, v in ARMS[arm].items():
        flags += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    done = checkpoints(out)
    if done:
        saved, wanted = read_state(done[-1])["args"], vars(train.parse_args(flags))
        if any(saved.get(k) != wanted[k] for k in wanted if k not in ("out", "resume")):  # where, not what
            raise SystemExit(f"{out} holds a run with other flags: pick another --out, or remove it")
        if int(done[-1].name[5:]) == args.steps:
            return out
        flags = ["--resume", str(out)]
    code = train.main(flags)
    if code > 128:  # 128 + the signal: train.py saved the step it was on and stopped
        print(f"{arm}, seed {seed}: interrupted; run the same command again to continue it", file=sys.stderr)
        raise SystemExit(code)
    if code != 0:
        raise SystemExit(f"{arm}, seed {seed}: train.py failed (flags {' '.join(flags)})")
    return out


@torch.no_grad()
def retrieval_r1(model, domain, world):
    """R@1 (%) both ways in the domain and out of it (the broad world)."""
    r_in, r_out = (retrieval(*embed(model, ds), ds.captions) for ds in (domain, world))
    return dict(in_i2t_r1=r_in["i2t_r1"], in_t2i_r1=r_in["t2i_r1"], out_i2t_r1=r_out["i2t_r1"],
                out_t2i_r1=r_out["t2i_r1"])


@torch.no_grad()
def final_measures(model, start, judge, domain, last, args):
    """Everything at the end of a fine-tune: retrieval (out of domain: `last`, the curve's final point), collapse,
    and generation from the domain's captions."""
    img, txt = embed(model, domain)
    r = {f"in_{k}": v for k, v in retrieval(img, txt, domain.captions).items() if k != "chance_r1"}
    r.update({k: v for k, v in last.items() if k.startswith("out_")})
    r.update(cos=collapse(img), rankme=rankme(img), uniformity=uniformity(img))
    n = min(args.n_gen, len(domain))
    prompts = domain.captions[:n]
    gen = generate(model, prompts, SAMPLE["steps"], SAMPLE["guidance"], 0, args.res, 50)  # uint8 (n, H, W, 3)
    r.update({f"judge_{a}": 100 * v for a, v in judge.accuracy(gen, [domain.label(i) for i in range(n)]).items()})
    feat = embed_images(start, gen.permute(0, 3, 1, 2).float() / 127.5 - 1)  # the pretrained CLIP judges
    r["clip_score"] = clip_score(feat, embed_texts(start, prompts))
    r["fd"] = frechet(feat, embed_images(start, torch.stack([domain[i][0] for i in range(n)])))
    return r


def measured(arm, seed, start, judge, domain, world, args):
    """{"curve": retrieval at each checkpoint, "final": everything at the end} of one arm and seed, fine-tuning
    it first; kept in its run folder and reused by a later call with the same measuring flags."""
    run = fine_tune(arm, seed, args) if ARMS[arm] else Path(args.out) / "runs" / arm
    key = {k: getattr(args, k) for k in ("split", "n_eval", "n_gen")}
    # the --every grid and the end, not a step an interrupt saved (Ctrl-C, SIGTERM) that the continued run keeps
    grid = [s for s in (int(c.name[5:]) for c in checkpoints(run)) if s == args.steps or args.every and s % args.every == 0]
    kept = run / f"measures-{args.split}.json"
    was = json.loads(kept.read_text()) if kept.is_file() else None
    # a kept curve with an off-grid step (measured before they were left out) is measured again
    if was and was["key"] == key and [c["step"] for c in was["measures"]["curve"]] == [0] + grid:
        return was["measures"]
    model, curve = start, [{"step": 0, **retrieval_r1(start, domain, world)}]
    for step in grid:
        model = load_model(run / f"step_{step:06d}")[0].eval()
        curve.append({"step": step, **retrieval_r1(model, domain, world)})
    measures = {"curve": curve, "final": final_measures(model, start, judge, domain, curve[-1], args)}
    write_atomic(kept, lambda tmp: tmp.write_text(json.dumps({"key": key, "measures": measures})))
    return measures


def write_atomic(path, write):
    """write(tmp) to a temp file beside `path`, then rename it over `path`: processes run in parallel (one per
    seed) share the results and the pretrained arm's measures, and none may read or keep half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")  # the suffix: savefig's format
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def summary(results):
    """{arm: {measure: (mean, std over seeds)}} of the final measures."""
    def mean_std(xs):
        t = torch.tensor(xs, dtype=torch.float64)
        return t.mean().item(), t.std().item() if len(xs) > 1 else 0.0
    return {arm: {k: mean_std([s["final"][k] for s in seeds.values()]) for k in next(iter(seeds.values()))["final"]}
            for arm, seeds in results.items()}


COLUMNS = [  # (header, measure, format): two tables, retrieval and embedding space, then generation
    [("in I→T R@1", "in_i2t_r1", "{:.1f}"), ("in T→I R@1", "in_t2i_r1", "{:.1f}"), ("in I→T R@5", "in_i2t_r5", "{:.1f}"),
     ("in T→I R@5", "in_t2i_r5", "{:.1f}"), ("in I→T R@10", "in_i2t_r10", "{:.1f}"), ("in T→I R@10", "in_t2i_r10", "{:.1f}"),
     ("out I→T R@1", "out_i2t_r1", "{:.1f}"), ("out T→I R@1", "out_t2i_r1", "{:.1f}"),
     ("mean cos ↓", "cos", "{:.3f}"), ("RankMe ↑", "rankme", "{:.1f}"), ("uniformity ↓", "uniformity", "{:.2f}")],
    [("judge kind", "judge_kind", "{:.1f}"), ("judge colour", "judge_colour", "{:.1f}"),
     ("judge pattern", "judge_pattern", "{:.1f}"), ("judge hem", "judge_hem", "{:.1f}"),
     ("CLIP score ↑", "clip_score", "{:.2f}"), ("FD ↓", "fd", "{:.3f}")],
]


def markdown(summ):
    tables = []
    for cols in COLUMNS:
        lines = ["| arm | " + " | ".join(h for h, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for arm, m in summ.items():
            cells = [(f + " ± " + f).format(*m[k]) if m[k][1] else f.format(m[k][0]) for _, k, f in cols]
            lines.append(f"| {arm} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def plot(results, path):
    """In-domain and out-of-domain R@1 (mean of both directions) over steps, one line per arm, seed spread."""
    import matplotlib  # optional: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for arm, seeds in results.items():
        if arm == "pretrained":
            continue
        for ax, side in zip(axes, ("in", "out")):
            at = {}  # {step: each seed's R@1 there}: the seeds' curves need not have the same steps
            for s in seeds.values():
                for c in s["curve"]:
                    at.setdefault(c["step"], []).append((c[f"{side}_i2t_r1"] + c[f"{side}_t2i_r1"]) / 2)
            steps = sorted(at)
            line, = ax.plot(steps, [sum(at[s]) / len(at[s]) for s in steps], label=arm)
            ax.fill_between(steps, [min(at[s]) for s in steps], [max(at[s]) for s in steps], color=line.get_color(),
                            alpha=0.15)
    for ax, title in zip(axes, ("in domain (demo test): R@1, mean of I→T and T→I", "out of domain (world test): R@1")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel("R@1 (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def parse_args(argv, demo):
    """-> (args, arms, seeds as ints); a bad flag stops with one line."""
    p = argparse.ArgumentParser(prog="python -m tools.ablation",
                                description="Fine-tune the pretrained tiny UniDiff per loss arm; measure each.")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from: {', '.join(ARMS)} (default: all)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds: data order and noise (default 0,1,2)")
    p.add_argument("--steps", type=int, default=demo["steps"], help=f"fine-tuning steps (default {demo['steps']})")
    p.add_argument("--every", type=int, default=50, help="steps between retrieval measurements (default 50)")
    p.add_argument("--lr-unet", type=float, default=demo["lr_unet"], help=f"(default {demo['lr_unet']:g})")
    p.add_argument("--lr-clip", type=float, default=demo["lr_clip"], help=f"(default {demo['lr_clip']:g})")
    p.add_argument("--train-size", type=int, help="fine-tune on the first N demo training images (default: all 400)")
    p.add_argument("--split", default="test", choices=["val", "test"],
                   help="the demo and world splits measured: val to choose a protocol, test to report it (default test)")
    p.add_argument("--n-eval", type=int, help="measure on the first N items of each split (default: all)")
    p.add_argument("--n-gen", type=int, default=200, help="images generated from domain captions (default 200)")
    p.add_argument("--out", default="runs/ablation", help="folder for the runs and results (default runs/ablation)")
    p.add_argument("--plot", help="the PNG plot (default OUT/ablation.png)")
    args = p.parse_args(argv)
    arms, seeds = args.arms.split(","), args.seeds.split(",")
    if set(arms) - set(ARMS):
        p.error(f"unknown arm(s) {sorted(set(arms) - set(ARMS))}: choose from {', '.join(ARMS)}")
    if not all(s.isdigit() for s in seeds):
        p.error(f"--seeds {args.seeds}: comma-separated whole numbers, e.g. 0,1,2")
    if args.steps < 1:
        p.error(f"--steps {args.steps}: fine-tuning steps, at least 1")
    if args.every < 0:
        p.error(f"--every {args.every}: steps between retrieval measurements, at least 0 (0: only at the end)")
    for flag, n in (("--train-size", args.train_size), ("--n-eval", args.n_eval)):
        if n is not None and n < 1:
            p.error(f"{flag} {n}: the first N items, at least 1 (default: all)")
    if args.n_gen < 2:
        p.error(f"--n-gen {args.n_gen}: FD fits a covariance to the generated images, which needs at least 2")
    args.res = demo["res"]
    return args, arms, [int(s) for s in seeds]


def write_results(results, args, domain, world, t0):
    """OUT/results.json, OUT/results.md and the plot; prints the tables."""
    summ = summary(results)
    out = Path(args.out)
    protocol = {k: v for k, v in vars(args).items() if k not in ("out", "plot")}
    results_json = json.dumps({"protocol": protocol, "results": results, "summary": summ, "seconds": time.time() - t0},
                              indent=1)
    write_atomic(out / "results.json", lambda tmp: tmp.write_text(results_json))
    text = markdown(summ) + (f"\n\n{args.split} splits: demo {len(domain)} pairs, world {len(world)} pairs; "
                             f"seeds {args.seeds}; {args.steps} steps; {time.time() - t0:.0f}s in all.")
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text + "\n"))
    plot(results, args.plot or out / "ablation.png")
    print(text)


def main(argv=None):
    demo = defaults("tiny", "demo")
    args, arms, seeds = parse_args(argv, demo)
    t0 = time.time()
    torch.manual_seed(0)
    domain = open_dataset("demo", args.split, args.res)
    world = open_dataset("world", args.split, args.res)
    if args.n_eval:  # a quick run
        domain.keep_first(args.n_eval)
        world.keep_first(args.n_eval)
    start, judge = UniDiff.from_pretrained(demo["weights"]).eval(), load_judge()
    results = {}
    for arm in arms:
        results[arm] = {}
        for seed in seeds[:1] if ARMS[arm] is None else seeds:  # the start model: the same for every seed
            results[arm][seed] = measured(arm, seed, start, judge, domain, world, args)
            print(f"ablation: {arm}, seed {seed} done ({time.time() - t0:.0f}s)", flush=True)
    write_results(results, args, domain, world, t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
