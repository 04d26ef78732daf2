"""Build a data preset (data/<name>/: images/ + metadata.jsonl) from a public release.

    python -m tools.prepare deepfashion --src DeepFashion-MultiModal [--out data]   # fashion_man, fashion_woman
    python -m tools.prepare products --src fashion-product-images [--out data]      # ecommerce_product

Every image is decoded once here, so a prepared set holds only images that load; images are hard-linked
where possible. The split is seeded: by garment (DeepFashion) or by product id.
"""
import argparse
import csv
import json
import os
import re
import shutil
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data import IMAGE_EXTS, TEST_FRACTION, DataError, Tally, probe, split_of


def link_or_copy(src, dst):
    """Hard-link (no extra disk) when src and dst share a file system, else copy."""
    if dst.exists():
        if os.path.samefile(src, dst):
            return "hard-linked"
        dst.unlink()
    try:
        os.link(src, dst)
        return "hard-linked"
    except OSError:
        shutil.copyfile(src, dst)
        return "copied"


def write_sets(out, candidates, skipped):
    """candidates: (set name, source image, metadata row). Writes out/<set>/images/ + metadata.jsonl."""
    # Decode every image once here (threads: PIL decodes without the GIL), so a prepared set holds only
    # images that load; at training time only the cheap header check runs.
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        probes = list(pool.map(lambda c: probe(c[1], decode=True), candidates))
    rows, how = {}, Counter()
    for (name, src, row), (reason, detail, _) in zip(candidates, probes):
        if reason:
            skipped.add(reason, f"{src.name} ({detail})" if detail else src.name)
            continue
        (out / name / "images").mkdir(parents=True, exist_ok=True)
        how[link_or_copy(src, out / name / row["file_name"])] += 1
        rows.setdefault(name, []).append(row)
    if not rows:
        raise DataError("no usable image–caption pairs. " + " ".join(skipped.lines("Skipped")))
    for name, rs in sorted(rows.items()):
        tmp = out / name / "metadata.jsonl.tmp"  # written whole, then renamed: never half a file
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rs), "utf-8")
        os.replace(tmp, out / name / "metadata.jsonl")
        n_test = sum(r["split"] == "test" for r in rs)
        print(f"{name}: {len(rs)} images ({len(rs) - n_test} train / {n_test} test) -> {out / name}/metadata.jsonl")
    print("images: " + ", ".join(f"{n} {h}" for h, n in sorted(how.items())))
    for line in skipped.lines("skipped"):
        print(line)
    return {name: len(rs) for name, rs in rows.items()}


def source_images(folder):
    if not folder.is_dir():
        raise DataError(f"{folder}/ not found")
    return {p.name: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_EXTS}


def garment_id(name):
    """The item a DeepFashion-MultiModal image shows: `WOMEN-Dresses-id_00000002-04_1_front.jpg` is item
    `id_00000002` (an In-shop product), photo set `04`, view `1_front`. All sets and views of an item
    share a split (In-shop's own benchmark splits by item too), else test images have siblings in train."""
    m = re.search(r"id_\d+", name)
    return m.group() if m else name


def read_captions(src):
    """src/captions.json -> {image file name: caption}."""
    try:
        captions = json.loads((src / "captions.json").read_text("utf-8"))
    except FileNotFoundError:
        raise DataError(f"{src}/captions.json not found: --src is the DeepFashion-MultiModal folder "
                        "holding images/ and captions.json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{src}/captions.json is not valid UTF-8 JSON ({e})") from None
    if not isinstance(captions, dict):
        raise DataError(f"{src}/captions.json: expected an object mapping image file name -> caption")
    return captions


def prepare_deepfashion(src, out="data", seed=0):
    """DeepFashion-MultiModal (images/MEN-*, images/WOMEN-*, captions.json) -> out/fashion_man, out/fashion_woman."""
    src, out, skipped = Path(src), Path(out), Tally()
    captions = read_captions(src)
    images = source_images(src / "images")
    for name in sorted(images.keys() - captions.keys()):
        skipped.add("image without caption", name)
    for name in sorted(captions.keys() - images.keys()):
        skipped.add("caption without image", name)
    candidates = []
    for name in sorted(images.keys() & captions.keys()):
        text = captions[name].strip() if isinstance(captions[name], str) else ""
        subset = {"MEN-": "fashion_man", "WOMEN-": "fashion_woman"}.get(name.split("-")[0] + "-")
        if not text:
            skipped.add("empty caption", name)
        elif subset is None:
            skipped.add("name starts with neither MEN- nor WOMEN-", name)
        else:
            group = garment_id(name)
            candidates.append((subset, images[name], {"file_name": f"images/{name}", "text": text,
                                                      "split": split_of(group, seed), "group": group}))
    return write_sets(out, candidates, skipped)


def read_styles(src, skipped):
    """src/styles.csv -> {id: {column: value}}; faulty lines are skipped and counted."""
    try:
        lines = (src / "styles.csv").read_bytes().splitlines()
    except FileNotFoundError:
        raise DataError(f"{src}/styles.csv not found: --src holds styles.csv and images/<id>.jpg") from None
    header = next(csv.reader([lines[0].decode("utf-8-sig", "replace")])) if lines else []
    if "id" not in header or "productDisplayName" not in header:
        raise DataError(f"{src}/styles.csv: the header must name the columns id and productDisplayName")
    k, rows = header.index("productDisplayName"), {}
    for n, raw in enumerate(lines[1:], 2):
        where = f"styles.csv line {n}"
        if not raw.strip():
            continue
        try:
            fields = next(csv.reader([raw.decode("utf-8")]))
        except UnicodeDecodeError:
            skipped.add("styles.csv line not valid UTF-8", where)
            continue
        extra = len(fields) - len(header)
        if extra < 0:
            skipped.add("styles.csv line with too few columns", where)
            continue
        # The public file has unquoted commas inside productDisplayName: join those pieces back.
        fields[k:k + extra + 1] = [",".join(fields[k:k + extra + 1])]
        row = {h: f.strip() for h, f in zip(header, fields)}
        if row["id"] in rows:
            skipped.add("duplicate id", where)
            continue
        rows[row["id"]] = row
    return rows


def prepare_products(src, out="data", seed=0):
    """Fashion Product Images (styles.csv + images/<id>.jpg) -> out/ecommerce_product."""
    src, out, skipped = Path(src), Path(out), Tally()
    rows = read_styles(src, skipped)
    images = {Path(name).stem: p for name, p in source_images(src / "images").items()}
    for i in sorted(images.keys() - rows.keys()):
        skipped.add("image without caption", images[i].name)
    for i in sorted(rows.keys() - images.keys()):
        skipped.add("caption without image", f"id {i}")
    candidates = []
    for i in sorted(images.keys() & rows.keys()):
        attrs = dict(rows[i])
        text = attrs.pop("productDisplayName")
        if not text:
            skipped.add("empty caption", f"id {i}")
            continue
        row = {"file_name": f"images/{images[i].name}", "text": text, "split": split_of(i, seed), **attrs}
        candidates.append(("ecommerce_product", images[i], row))
    return write_sets(out, candidates, skipped)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.prepare",
                                description="Build a UniDiff data preset from a public release. deepfashion: SRC "
                                "holds images/ (MEN-*, WOMEN-*) and captions.json -> OUT/fashion_man, "
                                "OUT/fashion_woman; the split is seeded by garment (id_XXXXXXXX in the file name: all "
                                "views of a garment share a split). products: SRC holds styles.csv and "
                                "images/<id>.jpg -> OUT/ecommerce_product; seeded by id. "
                                f"{TEST_FRACTION:.0%} of the garments or ids go to test. Images are hard-linked "
                                "where possible.")
    p.add_argument("source", choices=["deepfashion", "products"])
    p.add_argument("--src", required=True, help="the downloaded release folder")
    p.add_argument("--out", default="data", help="where the sets are written (default: data)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: 0)")
    args = p.parse_args(argv)
    prepare = {"deepfashion": prepare_deepfashion, "products": prepare_products}[args.source]
    try:
        prepare(args.src, args.out, args.seed)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
