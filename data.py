"""Image–caption data: folders, named presets and the built-in synthetic sets (world, demo).

An item is (pixels float32 (3, H, W) in [-1, 1], the VAE's range; caption), resized (bicubic) to just cover `size`
(512 or "512x768", as --res) and centre-cropped; no augmentation. Folders, splits, bad rows: docs/training.md#data."""
import hashlib
import json
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps
from torch.utils.data import Dataset

from clip import resize_crop, to_rgb

DEEPFASHION = "python -m tools.prepare deepfashion --src DIR  (DeepFashion-MultiModal: images/ + captions.json)"
PRODUCTS = "python -m tools.prepare products --src DIR  (Fashion Product Images: styles.csv + images/<id>.jpg)"
# name -> the command that builds data/<name>/ (world and demo are built in)
PRESETS = {"fashion_woman": DEEPFASHION, "fashion_man": DEEPFASHION, "ecommerce_product": PRODUCTS,
           "world": None, "demo": None}
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TEST_FRACTION = 0.1
MODE_NAMES = {"1": "black-and-white", "L": "grayscale", "LA": "grayscale+alpha", "P": "palette",
              "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale", "I": "integer grayscale"}
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


class DataError(Exception):
    """A data problem that stops the run; the message says what to do (train.py prints it)."""


class Tally:
    """Counts of reasons, each with its first example, e.g. skipped 2: missing image (e.g. a.jpg)."""

    def __init__(self):
        self.counts, self.example = Counter(), {}

    def add(self, reason, where):
        self.counts[reason] += 1
        self.example.setdefault(reason, where)

    def lines(self, verb):
        return [f"{verb} {n}: {r} (e.g. {self.example[r]})" for r, n in self.counts.most_common()]


def split_of(key, seed=0):
    """'train' or 'test' for a group, file name or id: stable across runs and machines, seeded."""
    h = int.from_bytes(hashlib.sha256(f"{seed}/{key}".encode()).digest()[:8], "big")
    return "test" if h < TEST_FRACTION * 2**64 else "train"


# ---------------------------------------------------------------------------- images

def ends_cleanly(path, fmt):
    with open(path, "rb") as f:
        f.seek(max(0, os.fstat(f.fileno()).st_size - 64))
        return f.read().rstrip(b"\0").endswith(END_MARKERS.get(fmt, b""))


def parse_res(res):
    """A resolution as --res takes it -> (width, height): 512 or "512" is a square, "512x768" width × height."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", str(res))
    if not m or int(m[1]) == 0 or m[2] is not None and int(m[2]) == 0:
        raise ValueError(f"resolution {res!r}: give WIDTHxHEIGHT in pixels (e.g. 512x768), or one number for a square")
    return int(m[1]), int(m[2] or m[1])


def res_name(size):  # (width, height) as --res writes it
    W, H = size
    return W if W == H else f"{W}x{H}"


def probe(path, size=(0, 0), decode=False):
    """(skip reason or None, detail, conversions) for one image file at `size` (W, H); cheap unless `decode`."""
    try:
        with Image.open(path) as im:
            mode, (w, h) = im.mode, im.size
            # Truncation shows only at decode: decode (at 1/8 scale for JPEG) files missing their
            # end marker now, so the skip is counted here and not lost inside a DataLoader worker.
            if decode or not ends_cleanly(path, im.format):
                im.draft(im.mode, (64, 64))
                im.load()
    except FileNotFoundError:
        return "missing image", "", []
    except Exception as e:  # any decoder failure is a fault of the file, not of the program
        return "unreadable image", f"{type(e).__name__}: {e}", []
    conversions = [f"{MODE_NAMES.get(mode, mode)} → RGB"] if mode != "RGB" else []
    if w < size[0] or h < size[1]:
        conversions.append(f"smaller than {res_name(size)} px → upscaled")
    return None, "", conversions


def to_pixels(rgb):
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1


def load_pixels(path, size):
    """An image file -> (3, H, W) in [-1, 1], `size` = (W, H)."""
    with Image.open(path) as im:
        im.draft(im.mode, size)  # JPEG: decode at the smallest scale still covering size
        im = to_rgb(ImageOps.exif_transpose(im))
    return to_pixels(np.asarray(resize_crop(im, size)))  # (3, H, W)


# ---------------------------------------------------------------------------- folders

def read_metadata(root, skipped):
    rows = []
    for n, raw in enumerate((root / "metadata.jsonl").read_bytes().splitlines(), 1):
        where = f"metadata.jsonl line {n}"
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8").lstrip("\ufeff"))
        except ValueError as e:  # UnicodeDecodeError or json.JSONDecodeError
            skipped.add(f"metadata line not valid {'UTF-8' if isinstance(e, UnicodeDecodeError) else 'JSON'}", where)
            continue
        if not (isinstance(row, dict) and isinstance(row.get("file_name"), str) and isinstance(row.get("text"), str)):
            skipped.add("metadata line without file_name and text", where)
            continue
        group = row.get("group")
        rows.append((row["file_name"], row["text"], row.get("split"), None if group is None else str(group)))
    return rows


def read_pairs(root, skipped):
    rows, images = [], sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    for p in images:
        name = p.relative_to(root).as_posix()
        try:
            rows.append((name, p.with_suffix(".txt").read_text("utf-8"), None, None))
        except FileNotFoundError:
            skipped.add("image without caption", name)
        except UnicodeDecodeError:
            skipped.add("caption file not valid UTF-8", p.with_suffix(".txt").relative_to(root).as_posix())
    stems = {p.with_suffix("") for p in images}
    for t in sorted(root.rglob("*.txt")):
        if t.with_suffix("") not in stems:
            skipped.add("caption without image", t.relative_to(root).as_posix())
    return rows


class FolderDataset(Dataset):
    """One split of a folder of images and captions; holds names only (picklable, no open files)."""

    def __init__(self, root, split="train", size=512, seed=0):
        self.root, self.split, self.size = Path(root), split, parse_res(size)  # (W, H)
        self.skipped, self.converted = Tally(), Tally()  # skips: whole folder; conversions: this split
        meta = (self.root / "metadata.jsonl").is_file()
        rows = read_metadata(self.root, self.skipped) if meta else read_pairs(self.root, self.skipped)
        if not rows and not self.skipped.counts:
            raise DataError(f"{self.root}: no images found (give images and a metadata.jsonl, or x.jpg + x.txt pairs)")
        with ThreadPoolExecutor(8) as pool:  # header reads: mostly waiting on the disk
            probes = list(pool.map(lambda r: probe(self.root / r[0], self.size), rows))
        given = {}  # group -> the splits metadata gives its rows: a row without one follows them
        for name, _, row_split, group in rows:
            if row_split in ("train", "test"):
                given.setdefault(group or name, set()).add(row_split)
        self.items, usable, splits = [], 0, {}
        for (name, text, row_split, group), (reason, detail, conversions) in zip(rows, probes):
            if not text.strip():
                reason, detail = "empty caption", ""
            elif row_split not in (None, "train", "test"):
                reason, detail = "split is neither train nor test", repr(row_split)
            if reason:
                self.skipped.add(reason, f"{name} ({detail})" if detail else name)
                continue
            usable += 1
            key = group or name
            theirs = given.get(key, ())
            row_split = row_split or (next(iter(theirs)) if len(theirs) == 1 else split_of(key, seed))
            splits.setdefault(key, set()).add(row_split)
            if split in (None, row_split):
                self.items.append((name, text.strip()))
                for c in conversions:
                    self.converted.add(c, name)
        by = "group" if any(r[3] is not None for r in rows) else "file name"
        how = "split from metadata.jsonl" if all(r[2] is not None for r in rows) else \
            f"split seeded by {by} where metadata has none: seed {seed}, {TEST_FRACTION:.0%} of the {by}s to test"
        if not self.items:
            if usable:  # every usable row is in the other split
                raise DataError(f"{self.root}: no {split} images: all {usable} usable rows are in "
                                f"{'test' if split == 'train' else 'train'} ({how}). Give some rows "
                                f'"split": "{split}" in metadata.jsonl'
                                + ("; train.py --eval-every 0 trains without test rows" if split == "test" else ""))
            raise DataError(f"{self.root}: no usable images. " + " ".join(self.skipped.lines("Skipped")))
        mixed = sorted(k for k, s in splits.items() if len(s) > 1)  # only metadata's own split column does this
        leak = f"; warning: {len(mixed)} groups have rows in both train and test (e.g. {mixed[0]!r})" if mixed else ""
        self.summary = f"{self.root}: {len(self.items)} {split or 'all'} images of {usable} usable; {how}{leak}"
        self.failed = set()  # per process: files that failed to decode after passing the index check

    def __len__(self):
        return len(self.items)

    def keep_first(self, n):
        """Only the first n items from now on (a smaller training set), said in the report."""
        if n < len(self.items):
            self.summary += f"; training on the first {n} of them (--train-size)"
        self.items = self.items[:n]

    @property
    def captions(self):
        return [text for _, text in self.items]

    def __getitem__(self, i):
        for k in range(len(self.items)):
            name, text = self.items[(i + k) % len(self.items)]
            if name in self.failed:
                continue
            try:
                return load_pixels(self.root / name, self.size), text
            except Exception as e:  # a fault the index check could not see: use the next item, say so
                self.failed.add(name)
                self.skipped.add("unreadable image (found while loading)", name)
                print(f"data: skipped unreadable image {self.root / name} ({type(e).__name__}: {e}); "
                      "using the next one", file=sys.stderr)
        raise DataError(f"{self.root}: none of the {len(self.items)} {self.split} images could be decoded")

    def report(self, token_lengths=None):
        """The summary and the counted skips and conversions; token_lengths: clip.Tokenizer.lengths (with BOS/EOS)."""
        long = [c for c, n in zip(self.captions, token_lengths(self.captions)) if n > 77] if token_lengths else []
        truncated = [f"truncated {len(long)}: caption longer than 77 tokens (e.g. {long[0][:60]!r})"] if long else []
        return [self.summary] + self.skipped.lines("skipped") + self.converted.lines("converted") + truncated


# ---------------------------------------------------------------------------- the synthetic world and demo

# Garment silhouettes in unit coordinates (x right, y down), drawn with PIL.ImageDraw.
SHAPES = {
    "t-shirt": [("polygon", [(.38, .15), (.62, .15), (.86, .26), (.78, .43), (.69, .38), (.69, .86),
                             (.31, .86), (.31, .38), (.22, .43), (.14, .26)], {})],
    "jacket": [("polygon", [(.38, .12), (.62, .12), (.80, .18), (.93, .80), (.82, .83), (.72, .42), (.72, .88),
                            (.28, .88), (.28, .42), (.18, .83), (.07, .80), (.20, .18)], {}),
               ("line", [(.5, .12), (.5, .88)], {"fill": 0, "width": .05})],
    "dress": [("polygon", [(.40, .10), (.60, .10), (.62, .40), (.86, .90), (.14, .90), (.38, .40)], {})],
    "skirt": [("polygon", [(.32, .36), (.68, .36), (.86, .80), (.14, .80)], {})],
    "trousers": [("polygon", [(.30, .12), (.70, .12), (.75, .90), (.56, .90), (.50, .42), (.44, .90), (.25, .90)], {})],
    "shoes": [("polygon", [(.06, .52), (.24, .52), (.28, .63), (.46, .68), (.46, .80), (.06, .80)], {}),
              ("polygon", [(.54, .52), (.72, .52), (.76, .63), (.94, .68), (.94, .80), (.54, .80)], {})],
    "hat": [("chord", [(.28, .22), (.72, .78)], {"start": 180, "end": 360}),
            ("ellipse", [(.08, .52), (.92, .66)], {})],
    "bag": [("rectangle", [(.20, .42), (.80, .86)], {}),
            ("arc", [(.32, .18), (.68, .66)], {"start": 180, "end": 360, "width": .06})],
    "top": [("polygon", [(.34, .14), (.42, .14), (.44, .26), (.56, .26), (.58, .14), (.66, .14), (.70, .36),
                         (.68, .78), (.32, .78), (.30, .36)], {})],
    "shorts": [("polygon", [(.26, .26), (.74, .26), (.82, .70), (.56, .70), (.50, .48), (.44, .70), (.18, .70)], {})],
    "boots": [("polygon", [(.08, .14), (.30, .14), (.30, .62), (.46, .70), (.46, .84), (.08, .84)], {}),
              ("polygon", [(.54, .14), (.76, .14), (.76, .62), (.92, .70), (.92, .84), (.54, .84)], {})],
    "scarf": [("polygon", [(.16, .18), (.84, .18), (.84, .34), (.64, .34), (.64, .88), (.46, .88), (.46, .34),
                           (.16, .34)], {})],
}
COLOURS = {"red": (200, 30, 30), "orange": (245, 120, 10), "yellow": (240, 215, 35), "green": (40, 150, 60),
           "blue": (40, 80, 200), "purple": (120, 50, 160), "pink": (240, 130, 180), "black": (30, 30, 30),
           "teal": (20, 140, 140), "brown": (120, 70, 30)}
PATTERNS = ["plain", "striped", "dotted", "checked", "zigzag", "argyle"]
# The domain's new attribute: a plain band along the garment's lower edge, in a colour no domain garment has.
HEMS = {"white": (245, 245, 245), "black": (25, 25, 25), "red": (200, 30, 30), "blue": (40, 80, 200)}
HEM_DEPTH = 0.125  # of the image height: 4 px at 32 px, twice a stripe, so a stripe is no hem
DOMAIN_KINDS = ["dress", "skirt", "top"]
DOMAIN_COLOURS = [c for c in COLOURS if c not in HEMS]  # so the hem always stands out from the garment


def render_garment(kind, colour, pattern, size, rng, hem=None, studio=False):
    """uint8 (size, size, 3): one garment on a light or `studio` (grey gradient) background, `hem` a band of colour."""
    S = 2 * size  # draw at twice the size, then average 2×2 blocks: smooth edges, cheap
    scale, dx, dy, phase = rng.uniform(.85, 1.0), *rng.uniform(-.06, .06, 2), rng.uniform(0, 1)
    mask = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(mask)
    for op, pts, kw in SHAPES[kind]:
        xy = [(((x - .5) * scale + .5 + dx) * S, ((y - .5) * scale + .5 + dy) * S) for x, y in pts]
        kw = {"fill": 255, **kw}
        if "width" in kw:
            kw["width"] = max(1, round(kw["width"] * scale * S))
        getattr(draw, op)(xy, **kw)
    mask = np.asarray(mask) > 127  # (S, S)
    x = np.arange(S)[None, :] / S + phase  # (1, S); pattern periods: 1/8 of the image, 1/6 for dots
    y = np.arange(S)[:, None] / S + phase  # (S, 1)
    motif = {"plain": np.zeros((S, S), bool), "striped": np.broadcast_to((y * 8) % 1 < .5, (S, S)),
             "dotted": ((x * 6) % 1 - .5) ** 2 + ((y * 6) % 1 - .5) ** 2 < .33**2,
             "checked": (np.floor(x * 8) + np.floor(y * 8)) % 2 == 0,
             "zigzag": (y * 8 + 2 * np.abs((x * 4) % 1 - .5)) % 1 < .5,  # stripes bent at 45° every 1/8
             "argyle": np.abs((x * 4) % 1 - .5) + np.abs((y * 4) % 1 - .5) < .5}[pattern]  # diamonds, period 1/4
    base = np.clip(np.array(COLOURS[colour]) + rng.integers(-15, 16, 3), 0, 255)
    light = base @ [.299, .587, .114] > 140
    contrast = np.array([40, 40, 40] if light else [250, 250, 250])
    background = rng.integers(222, 250) + rng.integers(-6, 7, 3)  # (3,)
    if studio:
        background = background - np.linspace(70, 130, S)[:, None, None]  # (S, 1, 3): grey, darker downwards
    garment = np.where(motif[..., None], contrast.astype(np.uint8), base.astype(np.uint8))  # (S, S, 3)
    if hem:
        bottom = np.flatnonzero(mask.any(1))[-1]  # the silhouette's lowest row
        band = np.arange(S)[:, None, None] > bottom - HEM_DEPTH * S  # (S, 1, 1)
        garment = np.where(band, np.array(HEMS[hem], np.uint8), garment)
    img = np.where(mask[..., None], garment, background.astype(np.uint8))
    return np.asarray(Image.fromarray(img).reduce(2))


def caption(label):
    """A world or demo label's caption: "a red striped dress", "a pair of plain blue shoes ... with a white hem"."""
    kind, colour, pattern = label["kind"], label["colour"], label["pattern"]
    words = ["plain", colour, kind] if pattern == "plain" else [colour, pattern, kind]
    pair = kind in ("trousers", "shoes", "shorts", "boots")
    article = "a pair of" if pair else "an" if words[0][0] in "aeiou" else "a"
    hem = "" if label["hem"] == "none" else f" with a {label['hem']} hem"
    return " ".join([article, *words]) + hem


class WorldDataset(Dataset):
    """The synthetic world to pretrain on: 12 garments × 10 colours × 6 patterns; each split a seeded stream."""
    sizes = {"train": 50_000, "val": 500, "test": 1000}
    stream = 1  # keeps the world's seeded streams apart from the domain's
    studio = False

    def __init__(self, split="train", size=32, seed=0):
        if split not in (*self.sizes, None):
            raise ValueError(f"split must be one of {', '.join(self.sizes)} or None, not {split!r}")
        self.split, self.size, self.seed = split, parse_res(size), seed  # size (W, H)
        self.n = self.sizes[split] if split else sum(self.sizes.values())

    def __len__(self):
        return self.n

    def keep_first(self, n):
        """Only the first n items from now on (a smaller training set; the demo's come in groups of 4 hems)."""
        self.n = min(self.n, n)

    def _where(self, i):
        """(split, index within it) of item i."""
        if not 0 <= i < self.n:
            raise IndexError(i)
        if self.split:
            return self.split, i
        for split, n in self.sizes.items():
            if i < n:
                return split, i
            i -= n

    def _rng(self, split, *key):
        return np.random.default_rng([self.seed, self.stream, list(self.sizes).index(split), *key])

    def label(self, i):
        """The true attributes of item i: {"kind", "colour", "pattern", "hem"} ("hem" is "none" in the world)."""
        split, j = self._where(i)
        k, c, p = self._rng(split, j).integers(0, [len(SHAPES), len(COLOURS), len(PATTERNS)])
        return {"kind": list(SHAPES)[k], "colour": list(COLOURS)[c], "pattern": PATTERNS[p], "hem": "none"}

    @property
    def captions(self):
        return [caption(self.label(i)) for i in range(self.n)]

    def __getitem__(self, i):
        label = self.label(i)
        rng = self._rng(*self._where(i), 1)  # the pose and tints: a stream of their own
        hem = None if label["hem"] == "none" else label["hem"]
        (W, H), S = self.size, max(self.size)  # drawn square, then its centre W x H, as a photo is cropped
        img = render_garment(label["kind"], label["colour"], label["pattern"], S, rng, hem, self.studio)  # (S, S, 3)
        top, left = (S - H) // 2, (S - W) // 2
        return to_pixels(img[top:top + H, left:left + W]), caption(label)

    def report(self, token_lengths=None):
        return [f"world: {self.n} synthetic {self.split or 'all'} images at {res_name(self.size)} px ({len(SHAPES)} "
                f"garments × {len(COLOURS)} colours × {len(PATTERNS)} patterns, light background, seed {self.seed})"]


class DomainDataset(WorldDataset):
    """`--data demo`: the world's domain slice to fine-tune on: 3 garments in a studio, each with every new hem."""
    sizes = {"train": 400, "val": 200, "test": 200}  # multiples of len(HEMS): whole groups
    stream = 2
    studio = True

    def label(self, i):
        split, j = self._where(i)
        n = len(HEMS)
        k, c, p = self._rng(split, j // n).integers(0, [len(DOMAIN_KINDS), len(DOMAIN_COLOURS), len(PATTERNS)])
        return {"kind": DOMAIN_KINDS[k], "colour": DOMAIN_COLOURS[c], "pattern": PATTERNS[p], "hem": list(HEMS)[j % n]}

    def report(self, token_lengths=None):
        return [f"demo: {self.n} synthetic {self.split or 'all'} images at {res_name(self.size)} px "
                f"({', '.join(DOMAIN_KINDS)} × {len(DOMAIN_COLOURS)} colours × {len(PATTERNS)} patterns × {len(HEMS)} "
                f"hems, studio background, seed {self.seed})"]


def open_dataset(name_or_dir, split="train", size=512, seed=0, root="data"):
    """A preset (`root`/<name>/; world and demo: synthetic) or a folder; split "train", "test" or None (all)."""
    if name_or_dir in ("world", "demo"):
        return {"world": WorldDataset, "demo": DomainDataset}[name_or_dir](split, size, seed)
    if split not in ("train", "test", None):
        raise ValueError(f"split must be 'train', 'test' or None, not {split!r}")
    path = Path(root) / name_or_dir if name_or_dir in PRESETS else Path(name_or_dir)
    if not path.is_dir():
        if name_or_dir in PRESETS:
            raise DataError(f"{path}/ not found: build the {name_or_dir} set first with\n  {PRESETS[name_or_dir]}")
        raise DataError(f"{path}: no such folder, and not a preset ({', '.join(PRESETS)})")
    return FolderDataset(path, split, size, seed)
