"""train.py --cache-latents: the training set as the frozen networks see it (unidiff.Encoded), stored once.

One safetensors file per (data, resolution, VAE, CLIP's input size, precision), named by their hash, so never a stale
one. Rows are written in place (each DDP rank its share; no tensor ever whole in memory) and read from a memory map."""
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from torch.utils.data import DataLoader, Dataset, Subset

from data import DataError, FolderDataset, parse_res
from runs import RunError, autocast, fmt_time, ignore_signals
from unidiff import Encoded

PROGRESS_EVERY = 5  # seconds between progress lines while encoding

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}  # safetensors' names


def cache_file(folder, name, dataset, res, model, dtype):
    """The cache file of `dataset` (`name`) at `res` in `dtype`, encoded by `model` (its VAE and CLIP's input size)."""
    h = hashlib.sha256(json.dumps([data_key(dataset), res, str(dtype), model.vae.cfg.to_json(),
                                   model.clip.cfg.vision.image_size]).encode())
    for k, v in model.vae.state_dict().items():  # the VAE's weights, bit for bit
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return folder / f"{name}-{res}-{h.hexdigest()[:16]}.safetensors"


def data_key(dataset):
    """What decides the items: a folder's files (name, caption, size, mtime), or a synthetic set's recipe."""
    if isinstance(dataset, FolderDataset):
        files = [(name, text, os.stat(dataset.root / name)) for name, text in dataset.items]
        return [(name, text, s.st_size, s.st_mtime_ns) for name, text, s in files]
    return [type(dataset).__name__, dataset.split, len(dataset), dataset.seed]


def layout(shapes, dtype):
    """Tensors {name: (N, ...)} in `dtype` -> (safetensors header bytes, {name: (offset of row 0, bytes per row)})."""
    header, where, offset = {}, {}, 0
    for name, shape in shapes.items():
        row = dtype.itemsize * math.prod(shape[1:])
        header[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + shape[0] * row]}
        where[name] = (offset, row)
        offset += shape[0] * row
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to a multiple of 8 bytes
    head = len(text).to_bytes(8, "little") + text
    return head, {name: (len(head) + o, row) for name, (o, row) in where.items()}


def create(path, shapes, dtype):
    """The file of layout(shapes, dtype) at full size, its rows zero until written."""
    with open(path, "wb") as f:
        f.write(layout(shapes, dtype)[0])
        f.truncate(f.tell() + dtype.itemsize * sum(map(math.prod, shapes.values())))


def write_rows(f, where, start, encoded, dtype):
    """Rows start, start+1, ... of each tensor: `encoded`, an Encoded batch, into the open file `f`."""
    for name, t in zip(Encoded._fields, encoded):
        offset, row = where[name]
        f.seek(offset + start * row)
        f.write(t.to(dtype).contiguous().cpu().view(-1).view(torch.uint8).numpy())


class CachedSet(Dataset):
    """The training set from its cache file: item i -> (image i Encoded, without a batch dimension; caption i)."""

    def __init__(self, path, captions):
        self.path, self.captions, self.file = str(path), captions, None

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        if self.file is None:  # opened where it is read (a loader worker): an open file does not pickle
            self.file = safe_open(self.path, "pt")
        return Encoded(*(self.file.get_slice(name)[i] for name in Encoded._fields)), self.captions[i]


def cached_training_set(model, train_set, data, res, run, micro, d, say, workers):
    """The training set from its cache in latent-cache/ beside the run folder, made first if missing."""
    # autocast's precision (runs.autocast): the VAE's last layer and CLIP's first compute in it, so nothing is lost
    dtype = torch.bfloat16 if d.cuda else torch.float32
    folder, name, n = run.parent / "latent-cache", Path(data).name, len(train_set)
    path, captions = cache_file(folder, name, train_set, res, model, dtype), train_set.captions
    if path.is_file():
        say(f"latent cache: {path} ({n} images; made for this data, resolution, VAE, CLIP input and precision)")
        return CachedSet(path, captions)
    (W, H), c, r = parse_res(res), model.vae.cfg.latent_channels, model.clip.cfg.vision.image_size
    latent = (n, c, H // model.down, W // model.down)
    shapes = {"mean": latent, "logvar": latent, "clip": (n, 3, r, r)}
    others = [p.name for p in folder.glob(f"{name}-*.safetensors")]
    size = f"{sum(map(math.prod, shapes.values())) * dtype.itemsize / 1e6:,.1f} MB"
    say(f"latent cache: encoding the {n} training images once into {path} ({size})"
        + (f"; not reusing {', '.join(others)}: made for other data, resolution, VAE, CLIP input or precision"
           if others else ""))
    tmp, t0 = folder / f".{path.name}.{run.name}.tmp", time.time()
    try:
        if d.master:
            folder.mkdir(parents=True, exist_ok=True)
            create(tmp, shapes, dtype)
        d.barrier()
        replaced = encode_share(model, train_set, tmp, shapes, dtype, micro, d, say, workers)
        if d.master and not replaced:
            os.replace(tmp, path)
        d.barrier()
    except OSError as e:  # a full disk: file writes raise OSError (ENOSPC); unreadable images are skipped in data.py
        raise RunError(f"could not write the latent cache {path} ({e.strerror or e}); nothing was kept: free some "
                       f"disk space (it needs {size}) and run again") from None
    finally:  # whatever stopped it (an error, Ctrl-C, SIGTERM): a half-written cache is as large as a whole one
        tmp.unlink(missing_ok=True)
    if replaced:
        raise DataError(f"{replaced} training image(s) could not be read while caching (named above): remove them "
                        f"from {data} and run again")
    say(f"latent cache: {n} images encoded in {fmt_time(time.time() - t0)}, into {path}")
    return CachedSet(path, captions)


def encode_share(model, train_set, tmp, shapes, dtype, micro, d, say, workers):
    """This rank's rows written into `tmp` -> how many images, over all ranks, could not be read (caption mismatch)."""
    n, captions = len(train_set), train_set.captions
    _, where = layout(shapes, dtype)
    lo, hi = d.rank * n // d.world, (d.rank + 1) * n // d.world  # this rank's rows
    loader = DataLoader(Subset(train_set, range(lo, hi)), batch_size=micro, num_workers=workers,
                        worker_init_fn=ignore_signals)
    t0 = t_said = time.time()
    row, replaced = lo, 0
    with open(tmp, "r+b") as f:
        for pixels, texts in loader:
            with autocast(d.device):
                write_rows(f, where, row, model.encode(pixels.to(d.device)), dtype)
            replaced += sum(text != captions[i] for i, text in enumerate(texts, row))
            row += len(texts)
            if time.time() - t_said >= PROGRESS_EVERY:
                t_said = time.time()
                say(f"latent cache: {row - lo}/{hi - lo} images encoded{' (rank 0, of its share)' if d.ddp else ''}"
                    f" ({t_said - t0:.0f}s)")
    replaced = torch.tensor([replaced], device=d.device)
    if d.ddp:  # every rank learns whether any rank met an unreadable image, and that all have finished writing
        dist.all_reduce(replaced)
    return int(replaced)
