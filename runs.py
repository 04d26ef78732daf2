"""Run folders: what train.py writes, and sample.py and eval.py read back; and stopping a run cleanly.

    runs/demo/  run.json (the start model and the arguments), init/ (a tiny run's initial weights), samples/
        step_000500/  a checkpoint: a diffusers folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/), clip/ (a
            transformers CLIPModel), live.safetensors (--ema: the trained weights; the folders hold the EMA),
            lora.safetensors and lora_vision.safetensors (--lora: save_lora) with base_weights.safetensors,
            optimizer.safetensors (AdamW's moments), state.json (step, args)
        log.jsonl  a JSON object per progress line and per validation (log_line); curves.png (draw_curves)
        tensorboard/  (--tensorboard) the same numbers and the sample grids, as TensorBoard's event files

Nothing is pickled; a checkpoint is written to a hidden temp folder, then renamed (a kill leaves the last one whole).
"""
import json
import os
import shutil
import signal
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError

from lora import add_lora, merge, merged, unmerge
from parallel import like, local
from unidiff import UniDiff
from weights import load_strict, read_safetensors, save_safetensors


class RunError(Exception):
    """A problem that stops the run cleanly; the message says what happened and what to do."""


def autocast(device):
    """The precision of training and sampling: bf16 autocast on a GPU, fp32 on the CPU (bf16 is slow there)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def master():
    """Rank 0, or the only process: the one that prints and writes the run folder."""
    return not dist.is_initialized() or dist.get_rank() == 0


def say(*a):
    if master():
        print(*a, flush=True)


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class StopSignal:
    """Ctrl-C or SIGTERM inside: finish the step, save, exit (all ranks agree); a second one exits at once."""

    def __init__(self, ddp, say):
        self.signum, self.say = 0, say  # the first signal's number, 0 until one comes
        self.group = dist.new_group(backend="gloo") if ddp else None  # the flag goes host to host: no GPU sync

    def __enter__(self):
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)

    def on_signal(self, signum, _):
        self.signum = signum
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        self.say(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step (a second Ctrl-C or SIGTERM "
                 "quits without saving)")

    def agreed(self):
        """The signal to stop on after this step (0: none), the same on every rank, whichever rank got it."""
        signum = self.signum  # read once: a signal arriving from here on counts for the next step
        if self.group is not None:
            flag = torch.tensor([signum])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            signum = int(flag)
        return signum


class Terminated(KeyboardInterrupt):
    """SIGTERM outside StopSignal (setup: the tiny VAE's fit, the latent cache): it unwinds as Ctrl-C does, so
    temp files go and train.main ends in one line."""


def terminated(signum, frame):
    raise Terminated


def ignore_signals(worker_id):
    """DataLoader workers share the terminal's (or torchrun's) process group: Ctrl-C and SIGTERM reach
    them too, and a dead worker would stop the run before it saves. The main process handles both."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# ------------------------------------------------------------------------------ reading

def checkpoints(run):
    """The complete `step_*` folders of a run folder, oldest first (by number: step_1000000 > step_999999)."""
    steps = [p for p in Path(run).glob("step_*") if p.name[5:].isdigit() and (p / "state.json").is_file()]
    return sorted(steps, key=lambda p: int(p.name[5:]))


def latest_checkpoint(path):
    """A checkpoint folder, or the newest complete `step_*` folder of a run folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    steps = checkpoints(path)
    if not steps:
        raise RunError(f"{path}: no checkpoint here (expected a run folder with step_* folders, or one of them)")
    return steps[-1]


def read_state(ckpt):
    """A checkpoint's state.json: {"step", "samples_seen", "world", "args", ...}."""
    return json.loads((Path(ckpt) / "state.json").read_text())


def check_size(model, width, height):
    """RunError unless `model` can train and sample at width x height (UniDiff.multiple)."""
    m = model.multiple
    if width % m or height % m:
        near = f"{max(m, round(width / m) * m)}x{max(m, round(height / m) * m)}"
        raise RunError(f"{width}x{height} px: this model needs width and height in multiples of {m} (its VAE's "
                       f"{model.down}x down-sampling times its UNet's {m // model.down}x); e.g. {near}")


def load_model(path, weights=None):
    """(UniDiff, checkpoint folder, "ema" or "live") for a run or checkpoint folder; `weights` None: the folders'."""
    ckpt = latest_checkpoint(path)
    live = ckpt / "live.safetensors"
    if weights == "ema" and not live.is_file():
        raise RunError(f"{ckpt} has no EMA weights (its run trained without --ema): use --weights live")
    model = UniDiff.from_pretrained(ckpt)
    if weights == "live" and live.is_file():
        args = read_state(ckpt)["args"]
        if args.get("lora"):  # the folders hold base + the EMA adapters: base + the trained adapters instead
            model.lora = add_lora(model, args["train"].split(","), args["lora"], args["lora_alpha"],
                                  targets=args.get("lora_targets", "attention"))  # saved before the flag: attention
            load_lora(ckpt, model.lora)
        load_params(model, read_safetensors(live))
        merge(model.lora)
    return model, ckpt, weights or ("ema" if live.is_file() else "live")


def load_params(model, tensors):
    """Copy named tensors (a subset of the model's parameters) into the model."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(like(value, params[name]))  # under FSDP: this rank's shard


def save_start(run, model, start, args):
    """Write `run.json`: where the run starts (a random start's weights go into `run/init/`) and its arguments."""
    run.mkdir(parents=True, exist_ok=True)
    if "init" in start:  # a tiny run's start: keep it with the run, it is the run's "pretrained" model
        shutil.rmtree(run / start["init"], ignore_errors=True)
        model.save(run / start["init"])
    (run / "run.json").write_text(json.dumps({"start": start, "args": vars(args)}, indent=2))


def load_start(run):
    """The model a run started from (eval.py's pretrained side and CLIP-score judge), and its name."""
    run = Path(run)
    if not (run / "run.json").is_file():
        raise RunError(f"{run}/run.json not found: it names the model the run started from; pass a run's checkpoint")
    start = json.loads((run / "run.json").read_text())["start"]
    if "weights" in start:  # a tiny run from saved weights (the demo: the shipped pretrained tiny model)
        return UniDiff.from_pretrained(run / start["init"]), f"pretrained {start['model']} ({start['weights']})"
    if "init" in start:
        return UniDiff.from_pretrained(run / start["init"]), f"{start['model']} initial weights ({run / start['init']})"
    return UniDiff.from_pretrained(start["sd"], clip=start["clip"]), f"pretrained {start['sd']} + {start['clip']}"


# ------------------------------------------------------------------------------ checkpoints

def save_checkpoint(run, step, model, named, opt_tensors, ema, state):
    """Write `run/step_XXXXXX/` atomically; the model folders hold the EMA if any, and LoRA adapters merged;
    `opt_tensors`: AdamW's state (optimizer_tensors)."""
    final, tmp = run / f"step_{step:06d}", run / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with swap_in([p for _, p in named], ema), merged(model.lora) as base:
            model.save(tmp)
            if model.lora:
                save_lora(model.lora, base, tmp)
        save_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        if ema is not None:
            save_safetensors(dict(named), tmp / "live.safetensors")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # never leave half a checkpoint behind
        if isinstance(e, (OSError, SafetensorError)):  # safetensors reports a full disk as its own error
            prev = checkpoints(run)
            kept = f"the previous checkpoint {prev[-1]} is intact" if prev else "no earlier checkpoint"
            raise RunError(f"could not write checkpoint {final} ({getattr(e, 'strerror', None) or e}); nothing was "
                           f"lost: {kept}. Free some disk space and --resume.") from None
        raise
    return final


def load_checkpoint(ckpt, model, named, opt):
    """The trained weights (if the folders hold the EMA) and AdamW's state into a model loaded from `ckpt`; -> step."""
    if (ckpt / "live.safetensors").is_file():
        load_params(model, read_safetensors(ckpt / "live.safetensors"))
    tensors = read_safetensors(ckpt / "optimizer.safetensors")
    state = {}
    for i, (name, p) in enumerate(named):  # state_dict() numbers the parameters in group order, as `named`
        if s := {k: tensors[f"{name}.{k}"] if k == "step" else like(tensors[f"{name}.{k}"], p)
                 for k in ("step", "exp_avg", "exp_avg_sq") if f"{name}.{k}" in tensors}:
            state[i] = s
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    return read_state(ckpt)["step"]


def save_lora(adapters, base, folder):
    """kohya's layout: `lora` (UNet, text encoder), `lora_vision` (CLIP's); `base_weights` holds the adapted layers'
    weights before merging, for --resume (no "lora" in its name: tools take *lora*.safetensors for adapters)."""
    sd = adapters.state_dict()
    vision = {k: v for k, v in sd.items() if k.startswith("lora_clip_")}
    for file, tensors in (("lora", {k: v for k, v in sd.items() if k not in vision}), ("lora_vision", vision),
                          ("base_weights", base)):
        if tensors:
            save_safetensors(tensors, folder / f"{file}.safetensors")


def load_lora(ckpt, adapters):
    """The adapters of a checkpoint (`save_lora`) back into `adapters`, and the base weights under them."""
    sd = {}
    for file in ("lora", "lora_vision"):
        if (ckpt / f"{file}.safetensors").is_file():
            sd.update(read_safetensors(ckpt / f"{file}.safetensors"))
    load_strict(adapters, sd, ckpt)
    base = ckpt / "base_weights.safetensors"
    unmerge(adapters, read_safetensors(base if base.is_file() else ckpt / "lora_base.safetensors"))  # its old name


def optimizer_tensors(opt, named):
    """AdamW's state as flat named tensors (`<param>.exp_avg`, ...): safetensors, not a pickle."""
    return {f"{name}.{k}": v if torch.is_tensor(v) else torch.tensor(v)
            for name, p in named for k, v in opt.state.get(p, {}).items()}


@contextmanager
def swap_in(params, ema):
    """Inside, the EMA weights (if any) are in the model (saving, validation); the trained ones come back after."""
    if ema is None:
        yield
        return
    live = [p.detach().clone() for p in params]
    torch._foreach_copy_([local(p.data) for p in params], [local(e) for e in ema])  # FSDP: shard by shard
    try:
        yield
    finally:
        torch._foreach_copy_([local(p.data) for p in params], [local(t) for t in live])


# ------------------------------------------------------------------------------ the run log

TENSORBOARD = {}  # run folder -> its SummaryWriter (--tensorboard; rank 0), opened by open_log


def log_line(run, record):
    """Append a record ({"step": ..., ...}) to `run/log.jsonl`, and its numbers to TensorBoard if open; on rank 0."""
    if master():
        with open(run / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer := TENSORBOARD.get(run):
            for tag, value in tags(record):
                writer.add_scalar(tag, value, record["step"])
            writer.flush()  # what log.jsonl holds, TensorBoard shows: not up to 2 minutes later


def tags(record, prefix=""):
    """A log record's numbers as (TensorBoard tag, value): nested keys joined by '/' (retrieval/test/i2t_r1), a
    progress line's losses under loss/ and the rest of it under train/ (TensorBoard groups tags by that prefix)."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from tags(value, f"{prefix}{key}/")
        elif key != "step":
            yield (prefix or ("loss/" if key in ("itc", "is", "rsc", "total") else "train/")) + key, value


def read_log(run):
    """The records of `run/log.jsonl` (none if absent); a line a kill cut short is left out."""
    log = Path(run) / "log.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return records


def open_log(run, step, tensorboard):
    """The run's logs from `step` on, on rank 0: log.jsonl and TensorBoard's events trimmed to it (a run resumed
    there logs the rest again; a new run, step -1, starts empty), and with `tensorboard` its writer opened."""
    if not master():
        return
    trim_log(run, step)
    folder = run / "tensorboard"
    SummaryWriter = summary_writer() if tensorboard or folder.is_dir() else None
    if SummaryWriter and folder.is_dir():
        trim_events(folder, step)
    if tensorboard and SummaryWriter:
        TENSORBOARD[run] = SummaryWriter(str(folder))
    elif tensorboard:  # the run's own setting, from --resume (given on the command line, config.check refuses it)
        say(f"no TensorBoard events in {folder}: this run was started with --tensorboard, and tensorboard is not "
            "installed (pip install tensorboard); the run goes on, log.jsonl has the numbers")


def close_log():
    """Close the TensorBoard writers (end of a run)."""
    while TENSORBOARD:
        TENSORBOARD.popitem()[1].close()


def summary_writer():
    """TensorBoard's SummaryWriter, or None without the tensorboard package (optional: only --tensorboard needs it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def trim_log(run, step):
    """Drop the log's records after `step` (atomically): a run stopped after its last checkpoint may have logged on."""
    if (run / "log.jsonl").is_file():
        tmp = run / "log.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in read_log(run) if r["step"] <= step))
        os.replace(tmp, run / "log.jsonl")


def trim_events(folder, step):
    """Drop the events after `step` from each TensorBoard event file, as from log.jsonl: TensorBoard's default (fast)
    loader ignores SummaryWriter's purge_step, and would show those steps twice. A file left with only its header
    goes; each kept record is copied as it was, byte for byte."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter
    for path in sorted(folder.glob("*tfevents*")):
        # a record a kill cut short is not read, so not kept
        kept = [r for r in RawEventFileLoader(str(path)).Load() if Event.FromString(r).step <= step]
        if len(kept) <= 1:  # the header (file_version, step 0) at most
            path.unlink()
            continue
        tmp = folder / "trimmed.tmp"  # not *tfevents*: TensorBoard would read a half-written one
        with open(tmp, "wb") as f:
            writer = RecordWriter(f)
            for record in kept:
                writer.write(record)
        os.replace(tmp, path)


def log_validation(run, step, found, real, gen):
    """A validation into the run folder: its sample grid in samples/ (rows: the `real` test images, the start's
    samples, `gen` the samples now; uint8 (N, H, W, 3) each), its retrieval ({split: retrieval}) in the log, the
    curves drawn again, and both for TensorBoard if open."""
    start = run / "samples" / "start.png"  # the start model's row: drawn once, before training
    if step == 0:
        save_grid([gen], start)
    rows = [real, load_row(start, len(gen)), gen] if step and start.is_file() else [real, gen]
    grid = save_grid(rows, run / "samples" / f"step_{step:06d}.png")
    if writer := TENSORBOARD.get(run):
        writer.add_image("samples", grid, step, dataformats="HWC")  # rows: real, start, now
    log_line(run, {"step": step, "retrieval": found})
    draw_curves(run)


NO_MATPLOTLIB_SAID = set()  # the run folders told that there is no picture: once each


def draw_curves(run):
    """`run/curves.png` from the log: the losses, and test R@1 in and out of domain, over the steps."""
    try:
        import matplotlib.figure  # optional: without it the run goes on, with no picture
    except ImportError:
        if run not in NO_MATPLOTLIB_SAID:
            NO_MATPLOTLIB_SAID.add(run)
            say(f"no {run / 'curves.png'}: matplotlib is not installed (pip install matplotlib); log.jsonl has "
                "the numbers")
        return
    records = read_log(run)
    fig = matplotlib.figure.Figure(figsize=(10, 4), layout="constrained")
    losses, recall = fig.subplots(1, 2)
    lines = [r for r in records if "total" in r]
    for key in ("total", "itc", "is", "rsc"):
        if any(r[key] for r in lines):  # a loss turned off stays 0: not drawn
            losses.plot([r["step"] for r in lines], [r[key] for r in lines], marker=".", label=key)
    for split, name, style in (("test", "in domain", "-"), ("out of domain test", "out of domain", "--")):
        got = [r for r in records if split in r.get("retrieval", {})]
        for way, arrow, color in (("i2t", "I→T", "C0"), ("t2i", "T→I", "C1")) if got else ():
            recall.plot([r["step"] for r in got], [r["retrieval"][split][f"{way}_r1"] for r in got], style,
                        color=color, marker=".", label=f"{name} {arrow}")
    for ax, title in ((losses, "training loss"), (recall, "test R@1 (%)")):
        ax.set(title=title, xlabel="step")
        if ax.has_data():
            ax.legend()
    tmp = run / "curves.tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, run / "curves.png")


# ------------------------------------------------------------------------------ images

def to_uint8(pixels):
    """(B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return ((pixels.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def save_grid(rows, path):
    """rows: list of uint8 (N, H, W, 3) -> one PNG, a row each, written atomically -> the grid, uint8 (H', W', 3)."""
    grid = torch.cat([torch.cat(list(r), dim=1) for r in rows], dim=0).numpy()  # (rows·H, N·W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)
    return grid


def load_row(path, n):
    """A one-row grid PNG of n images (save_grid) -> uint8 (n, H, W, 3)."""
    row = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy())  # (H, n·W, 3)
    return torch.stack(row.chunk(n, dim=1))
