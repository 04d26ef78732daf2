"""The claim in miniature: fine-tune the shipped pretrained tiny UniDiff on the demo's narrow domain with
each combination of the losses and each remedy for forgetting, and measure what each does in the domain, out
of it (forgetting), to the embedding space (collapse) and to generation (read by a frozen judge).

    python -m tools.ablation --plot assets/forgetting.png      # the forgetting study in docs/results.md (test splits)
    python -m tools.ablation --split val --arms "RSC feature" --seeds 0 --flags "--lambda-rsc 1"   # choosing: val
    python -m tools.ablation --cost                            # step time per arm, relative to ITC+IS

Each arm is `train.py --data demo` with its loss weights, the same data, steps, learning rates and seeds;
"pretrained" is the start model itself. Retrieval is measured every --every steps (a curve over steps),
everything else at the end; WiSE-FT's interpolations of each fine-tune with the start are measured too.
Writes OUT/results.json (every figure of every run), OUT/results.md (mean ± std over seeds), the curves' plot
and the front: in-domain against out-of-domain R@1.
"""
import argparse
import contextlib
import copy
import io
import json
import tempfile
import os
import sys
import time
from pathlib import Path

import torch

import train
from config import DEFAULTS, defaults
from data import open_dataset
from eval import (SAMPLE, clip_score, collapse, embed, embed_images, embed_texts, frechet, generate, rankme, retrieval,
                  uniformity)
from runs import checkpoints, load_model, read_state
from tools.judge import load_judge
from unidiff import UniDiff

# The train.py flags of each arm; the rest of the fine-tune is the demo's (config.py DEMO). The values marked
# "val" were chosen on the validation splits (docs/results.md, the forgetting study).
ITC_IS = dict(lambda_itc=1, lambda_is=1, lambda_rsc=0)
ARMS = {
    "pretrained": None,
    "ITC": dict(lambda_itc=1, lambda_is=0, lambda_rsc=0),
    "IS": dict(lambda_itc=0, lambda_is=1, lambda_rsc=0),
    "ITC+IS": ITC_IS,
    "ITC+IS+RSC": dict(lambda_itc=1, lambda_is=1, lambda_rsc=0.1),
    "ITC+IS+RSC one-way": dict(lambda_itc=1, lambda_is=1, lambda_rsc=0.1, rsc_form="kl-one-way"),
    "ITC+IS+RSC λ=1": dict(lambda_itc=1, lambda_is=1, lambda_rsc=1.0),
    "RSC feature": dict(ITC_IS, lambda_rsc=0.1, rsc_form="feature"),  # λ: val
    "RSC relational": dict(ITC_IS, lambda_rsc=0.1, rsc_form="relational"),  # λ: val
    "RSC anchored": dict(ITC_IS, lambda_rsc=1, rsc_form="anchored"),  # λ: val
    "L2-SP": dict(ITC_IS, l2sp=1),  # λ: val
    "LoRA 4": dict(ITC_IS, lora=4),
    "LoRA 16": dict(ITC_IS, lora=16),
    "small CLIP lr": dict(ITC_IS, lr_clip=1e-4),  # lr: val
    "IS no text grad": dict(ITC_IS, is_detach_text=True),
}
# the forgetting study's arms (the first protocols' are the others: docs/results.md)
STUDY = ["pretrained", "IS", "ITC+IS", "ITC+IS+RSC", "ITC+IS+RSC one-way", "RSC feature", "RSC relational",
         "RSC anchored", "L2-SP", "LoRA 4", "LoRA 16", "small CLIP lr", "IS no text grad"]
WISE = (0.25, 0.5, 0.75)  # WiSE-FT's α: the weights (1 − α) θ₀ + α θ of the start θ₀ and the fine-tune θ
GOAL = (50.0, 33.3)  # in-domain and out-of-domain R@1 (%, mean of both directions) the study aims for


def fine_tune(arm, seed, args):
    """Run train.py for one arm and seed -> its run folder. A run already there with the same flags is reused
    when complete and continued (--resume) when cut off, so the ablation can be stopped and started again."""
    out = Path(args.out) / "runs" / arm.replace(" ", "_") / f"seed{seed}"
    flags = ["--data", "demo", "--out", str(out), "--seed", str(seed), "--steps", str(args.steps),
             "--save-every", str(args.every), "--eval-every", "0"] + arm_flags(arm, args)
    done = checkpoints(out)
    if done:
        # a run saved before a flag existed ran with that flag's default
        saved, wanted = {**DEFAULTS, **read_state(done[-1])["args"]}, vars(train.parse_args(flags))
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


def arm_flags(arm, args):
    """The train.py flags of an arm: the ablation's learning rates, the arm's own flags, then --flags. Every arm
    starts from the demo as the studies ran it, without L2-SP (the demo's default since the forgetting study)."""
    flags = ["--lr-unet", str(args.lr_unet), "--lr-clip", str(args.lr_clip), "--l2sp", "0"]
    flags += ["--train-size", str(args.train_size)] if args.train_size else []
    for k, v in ARMS[arm].items():
        flags += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return flags + args.flags.split()


def wise_ft(start, tuned, alpha):
    """WiSE-FT (Wortsman et al. 2022): the model with weights (1 − α) θ₀ + α θ, of the start and of the fine-tune."""
    s0, model = start.state_dict(), copy.deepcopy(tuned)
    model.load_state_dict({k: torch.lerp(s0[k].float(), v.float(), alpha).to(v.dtype) if v.is_floating_point() else v
                           for k, v in tuned.state_dict().items()})
    return model


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
    key = {k: getattr(args, k) for k in ("split", "n_eval", "n_gen")} | {"wise": list(WISE)}
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
    measures = {"curve": curve, "final": final_measures(model, start, judge, domain, curve[-1], args),
                "wise": [{"alpha": a, **retrieval_r1(wise_ft(start, model, a), domain, world)}
                         for a in (WISE if ARMS[arm] else ())]}
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


def mean_std(xs):
    """(mean, std) over seeds; std 0 for one seed."""
    t = torch.tensor(xs, dtype=torch.float64)
    return t.mean().item(), t.std().item() if len(xs) > 1 else 0.0


def summary(results):
    """{arm: {measure: (mean, std over seeds)}} of the final measures."""
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


def r1(m, side):
    """R@1 in or out of the domain, the mean of both directions."""
    return (m[f"{side}_i2t_r1"] + m[f"{side}_t2i_r1"]) / 2


def goal_score(r_in, r_out):
    """The share of the goal that the weaker side reaches: min(in / 50, out / 33.3). The rule the study chooses by."""
    return min(r_in / GOAL[0], r_out / GOAL[1])


def front_points(seeds):
    """An arm's points on the front, {α: (in R@1, out R@1), each (mean, std over seeds)}: α = 1 is the fine-tune,
    the others its WiSE-FT interpolations with the start."""
    runs = list(seeds.values())
    points = {1.0: [m["final"] for m in runs]} | {w["alpha"]: [] for w in runs[0]["wise"]}
    for m in runs:
        for w in m["wise"]:
            points[w["alpha"]].append(w)
    return {a: tuple(mean_std([r1(m, side) for m in ms]) for side in ("in", "out")) for a, ms in sorted(points.items())}


def front_table(results):
    """One line per arm: in- and out-of-domain R@1 and the goal score of the fine-tune and of each WiSE-FT α."""
    alphas = sorted({w["alpha"] for seeds in results.values() for m in seeds.values() for w in m["wise"]}, reverse=True)
    head = ["arm", "in R@1", "out R@1", "goal score"] + [f"WiSE α={a:g}: in / out (score)" for a in alphas]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for arm, seeds in results.items():
        pts = front_points(seeds)
        (i, di), (o, do) = pts[1.0]
        cells = [arm, f"{i:.1f} ± {di:.1f}", f"{o:.1f} ± {do:.1f}", f"{goal_score(i, o):.3f}"]
        cells += [f"{pts[a][0][0]:.1f} / {pts[a][1][0]:.1f} ({goal_score(pts[a][0][0], pts[a][1][0]):.3f})"
                  if a in pts else "" for a in alphas]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_front(results, path):
    """In-domain against out-of-domain R@1 at the end: a marker per arm (bars: the seeds' std), its WiSE-FT curve
    through the start (α = 0) dashed, and the goal's corner."""
    import matplotlib  # optional: only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 6))
    start = front_points(results["pretrained"])[1.0] if "pretrained" in results else None
    for k, (arm, seeds) in enumerate(results.items()):
        if arm == "pretrained":
            ax.plot(start[0][0], start[1][0], "k*", ms=12, label="pretrained (WiSE α = 0)")
            continue
        pts = front_points(seeds)
        (i, di), (o, do) = pts[1.0]
        colour = plt.cm.tab20(k % 20)  # more arms than tab10 has colours
        ax.errorbar(i, o, xerr=di, yerr=do, fmt="osD^v<>ph"[k % 9], color=colour, ms=6, capsize=2, label=arm)
        curve = ([(start[0][0], start[1][0])] if start else []) + [(p[0][0], p[1][0]) for p in pts.values()]
        ax.plot(*zip(*curve), "--", color=colour, lw=1.5 if arm == "ITC+IS" else 0.7, alpha=0.7)
    ax.set(xlabel="in domain (demo): R@1 %, mean of I→T and T→I", ylabel="out of domain (world): R@1 %",
           title="The front: what the fine-tune learns against what it keeps")
    ax.set_xlim(0, max(70, ax.get_xlim()[1]))
    ax.set_ylim(0, max(60, ax.get_ylim()[1]))
    ax.add_patch(plt.Rectangle(GOAL, 100, 100, color="green", alpha=0.08, label="the goal"))  # after the limits
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


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
    if axes[0].lines:  # none with the pretrained arm alone
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)


def parse_args(argv, demo):
    """-> (args, arms, seeds as ints); a bad flag stops with one line."""
    p = argparse.ArgumentParser(prog="python -m tools.ablation",
                                description="Fine-tune the pretrained tiny UniDiff per loss arm; measure each.")
    p.add_argument("--arms", default=",".join(STUDY), help=f"comma-separated, from: {', '.join(ARMS)} (default: "
                   "the forgetting study's)")
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
    p.add_argument("--flags", default="", help='more train.py flags for every arm, given last, e.g. "--lambda-rsc 1"')
    p.add_argument("--plot", help="the curves' PNG plot (default OUT/ablation.png); the front goes beside it, "
                   "NAME-front.png")
    p.add_argument("--cost", action="store_true", help="time a short fine-tune of each arm instead (one process)")
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
    text = markdown(summ) + "\n\n" + front_table(results) + (f"\n\n{args.split} splits: demo {len(domain)} pairs, world {len(world)} pairs; "
                             f"seeds {args.seeds}; {args.steps} steps; {time.time() - t0:.0f}s in all.")
    write_atomic(out / "results.md", lambda tmp: tmp.write_text(text + "\n"))
    path = Path(args.plot or out / "ablation.png")
    plot(results, path)
    plot_front(results, path.with_name(path.stem + "-front.png"))
    print(text)


def cost(arms, args):
    """Seconds per step of each arm on this machine: a 40-step fine-tune less a 10-step one (setup and saving
    cancel), one arm after another in this process -> a table, relative to ITC+IS."""
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for arm in [a for a in arms if ARMS[a]]:
            took = []
            for steps in (10, 40):
                flags = ["--data", "demo", "--out", f"{tmp}/{arm}-{steps}".replace(" ", "_"), "--steps", str(steps),
                         "--save-every", "0", "--eval-every", "0"] + arm_flags(arm, args)
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    if train.main(flags) != 0:
                        raise SystemExit(f"{arm}: train.py failed (flags {' '.join(flags)})")
                took.append(time.perf_counter() - t0)
            times[arm] = (took[1] - took[0]) / 30
            print(f"cost: {arm}: {times[arm]:.3f} s/step", flush=True)
    base = times.get("ITC+IS")
    return "\n".join(["| arm | s/step | relative to ITC+IS |", "|---|---|---|"] +
                     [f"| {a} | {t:.3f} | {t / base:.2f} |" if base else f"| {a} | {t:.3f} | |" for a, t in times.items()])


def main(argv=None):
    demo = defaults("tiny", "demo")
    args, arms, seeds = parse_args(argv, demo)
    if args.cost:
        table = cost(arms, args)
        write_atomic(Path(args.out) / "cost.md", lambda tmp: tmp.write_text(table + "\n"))
        print(table)
        return 0
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
