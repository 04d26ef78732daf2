"""The latent cache of train.py --cache-latents: the training set as the frozen networks see it, stored once.

Row i holds image i as UniDiff.encode makes it (unidiff.Encoded): the frozen VAE's posterior, mean and
log-variance, and CLIP's view of the image, in the precision the step computes them in. A step on the cache
is then the step on the pixels without the VAE encoder: z0 is still drawn from the posterior, with the same
draws. One safetensors file per (data, resolution, VAE weights, precision), named by a hash of the four: a
run that changes any of them gets a new file, never a stale one. The rows are written in place, so no tensor
is ever whole in memory and each DDP rank writes its own share; they are read from a memory map.
"""
import hashlib
import json
import math
import os

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from data import FolderDataset
from unidiff import Encoded

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16"}  # safetensors' names


def cache_file(folder, name, dataset, res, vae, dtype):
    """The cache file of `dataset` (called `name`) at resolution `res`, encoded by `vae` in `dtype`."""
    h = hashlib.sha256(json.dumps([data_key(dataset), res, str(dtype)]).encode())
    for k, v in vae.state_dict().items():  # the VAE's weights, bit for bit
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return folder / f"{name}-{res}-{h.hexdigest()[:16]}.safetensors"


def data_key(dataset):
    """What decides the images and captions: a folder's files (name, caption, size, modification time), or a
    synthetic set's recipe (split, size, seed)."""
    if isinstance(dataset, FolderDataset):
        files = [(name, text, os.stat(dataset.root / name)) for name, text in dataset.items]
        return [(name, text, s.st_size, s.st_mtime_ns) for name, text, s in files]
    return [type(dataset).__name__, dataset.split, len(dataset), dataset.seed]


def layout(shapes, dtype):
    """A safetensors file of the tensors {name: (N, ...)} in `dtype`: its header, and where each tensor's rows
    are -> (header bytes, {name: (file offset of row 0, bytes per row)})."""
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
    head, where = layout(shapes, dtype)
    end = max(o + row * shapes[name][0] for name, (o, row) in where.items())
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(end)


def write_rows(f, where, start, encoded, dtype):
    """Rows start, start+1, ... of each tensor: `encoded`, an Encoded batch, into the open file `f`."""
    for name, t in zip(Encoded._fields, encoded):
        offset, row = where[name]
        f.seek(offset + start * row)
        f.write(t.to(dtype).contiguous().cpu().view(-1).view(torch.uint8).numpy())


class CachedSet(Dataset):
    """The training set read from its cache file: item i -> (image i Encoded, each tensor without a batch
    dimension; caption i). A loader stacks items into an Encoded batch, which UniDiff.losses takes."""

    def __init__(self, path, captions):
        self.path, self.captions, self.file = str(path), captions, None

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        if self.file is None:  # opened where it is read (a loader worker): an open file does not pickle
            self.file = safe_open(self.path, "pt")
        return Encoded(*(self.file.get_slice(name)[i] for name in Encoded._fields)), self.captions[i]
