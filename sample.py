"""Text to image with a trained run: DDIM + classifier-free guidance, one PNG grid, a row per prompt.

    python sample.py --ckpt runs/demo --prompt "a red striped dress" --prompt "a pair of blue shoes"
    python sample.py --ckpt runs/fashion_woman/step_001000 --prompt "..." --n 4 --steps 50 --out grid.png
"""
import argparse
import sys
from pathlib import Path

import torch

from data import parse_res
from runs import RunError, autocast, check_size, load_model, read_state, save_grid
from weights import WeightsError


def main(argv=None):
    p = argparse.ArgumentParser(description="Prompts -> a PNG grid (one row per prompt).")
    p.add_argument("--ckpt", required=True, help="a run folder (its latest checkpoint) or one checkpoint folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for more rows")
    p.add_argument("--n", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    p.add_argument("--height", type=int, help="pixels (default: the run's training resolution)")
    p.add_argument("--width", type=int, help="pixels (default: the run's training resolution)")
    p.add_argument("--out", default="grid.png", help="the PNG to write (default grid.png)")
    p.add_argument("--weights", choices=["ema", "live"], help="the EMA or the trained weights (default: EMA if any)")
    args = p.parse_args(argv)
    if args.n < 1:
        p.error(f"--n {args.n}: images per prompt, at least 1")
    if not 1 <= args.steps <= 1000:  # DDIM strides over SD's 1000 training timesteps
        p.error(f"--steps {args.steps}: DDIM steps, from 1 to 1000 (the schedule's timesteps)")
    for side in ("height", "width"):
        if getattr(args, side) is not None and getattr(args, side) < 1:
            p.error(f"--{side} {getattr(args, side)}: pixels, at least 1 (default: the run's training resolution)")
    try:
        model, ckpt, weights = load_model(args.ckpt, args.weights)
        W, H = parse_res(read_state(ckpt)["args"]["res"])  # (W, H) the run trained at
        w, h = args.width or W, args.height or H
        check_size(model, w, h)
    except (WeightsError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    with autocast(device):  # one seed per row, so a prompt's images do not depend on the other prompts
        rows = [model.generate([prompt] * args.n, steps=args.steps, guidance=args.guidance, seed=args.seed + i,
                               height=h, width=w) for i, prompt in enumerate(args.prompt)]
    save_grid(rows, Path(args.out))
    print(f"{args.out}: {len(rows)} prompt(s) × {args.n} images, {w}×{h}, {args.steps} steps, guidance {args.guidance}, "
          f"seed {args.seed}, from {ckpt} ({weights} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
