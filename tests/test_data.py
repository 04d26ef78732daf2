"""data.py: folders, bad input, seeded splits, the demo set; tools/prepare.py on release-shaped fixtures."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from tools import prepare

REPO = Path(__file__).resolve().parents[1]


def rgb(path, w=48, h=40, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def odd_images(folder):
    """One image of each kind that must be used after conversion: name -> expected conversions."""
    arr = np.random.default_rng(1).integers(0, 256, (40, 48, 4), dtype=np.uint8)
    Image.fromarray(arr[..., 0]).save(folder / "gray.jpg")
    Image.fromarray(arr, "RGBA").save(folder / "rgba.png")
    Image.fromarray(arr, "CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((arr[..., 0].astype(np.uint16) * 257)).save(folder / "deep.png")  # 16-bit grayscale
    rgb(folder / "tiny.jpg", 6, 5)
    return {"gray.jpg": "grayscale → RGB", "rgba.png": "RGBA → RGB", "cmyk.jpg": "CMYK → RGB",
            "deep.png": "16-bit grayscale → RGB", "tiny.jpg": "smaller than 32 px → upscaled"}


def bad_images(folder):
    """A corrupt and a truncated image (both must be skipped)."""
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 20)
    rgb(folder / "whole.jpg", 64, 64)
    full = (folder / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (folder / "whole.jpg").unlink()
    return ["corrupt.jpg", "truncated.jpg"]


def metadata_folder(root, split=None):
    """A folder in the imagefolder layout with every kind of bad input in it."""
    root.mkdir()
    good = [f"ok{i}.jpg" for i in range(6)]
    for i, name in enumerate(good):
        rgb(root / name, 48 + i, 40, seed=i)
    odd = odd_images(root)
    bad = bad_images(root)
    extra = {} if split is None else {"split": split}
    lines = [json.dumps({"file_name": n, "text": f"a photo of {n}", **extra}).encode() for n in good + list(odd) + bad]
    lines += [json.dumps({"file_name": "missing.jpg", "text": "gone", **extra}).encode(),
              json.dumps({"file_name": "ok0.jpg", "text": "   ", **extra}).encode(),
              b'{"file_name": "ok1.jpg", "text": "caf\xe9 latte"}',  # Latin-1, not UTF-8
              b'{"file_name": "ok2.jpg", "text": ',
              b""]
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines))
    return good, odd


def test_folder_skips_and_converts_each_bad_input(tmp_path):
    good, odd = metadata_folder(tmp_path / "set")
    ds = data.open_dataset(tmp_path / "set", split=None, size=32)
    assert sorted(name for name, _ in ds.items) == sorted(good + list(odd))
    assert ds.skipped.counts == {"unreadable image": 2, "missing image": 1, "empty caption": 1,
                                 "metadata line not valid UTF-8": 1, "metadata line not valid JSON": 1}
    assert ds.skipped.example["unreadable image"].startswith("corrupt.jpg (")
    assert ds.converted.counts == {c: 1 for c in odd.values()}
    report = "\n".join(ds.report())
    assert "skipped 2: unreadable image" in report and "converted 1: CMYK → RGB" in report
    for i in range(len(ds)):
        pixels, caption = ds[i]
        assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
        assert -1 <= pixels.min() and pixels.max() <= 1 and caption.startswith("a photo of")
    deep = ds[[n for n, _ in ds.items].index("deep.png")][0]
    assert deep.std() > 0.2  # 16-bit values scaled to 8 bits, not clipped to white


def test_resize_is_shorter_side_then_centre_crop(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, 20:60] = 255  # white centre square of a 2:1 image
    Image.fromarray(arr).save(root / "wide.png")
    (root / "wide.txt").write_text("a white square")
    pixels, caption = data.open_dataset(root, split=None, size=20)[0]
    assert caption == "a white square" and pixels.shape == (3, 20, 20)
    assert pixels[:, 2:-2, 2:-2].min() > 0.9  # the crop is the centre: all white inside
    assert pixels.mean() > 0.8  # (a left or right crop would be half black)



def test_portrait_resolution_keeps_head_and_shoes(tmp_path):
    """At W x H the image is scaled to cover W x H and its centre cut out: (3, H, W), the aspect kept."""
    root = tmp_path / "set"
    root.mkdir()
    arr = np.full((120, 60, 3), 255, np.uint8)  # a 1:2 portrait: a red "head" band on top, blue "shoes" below
    arr[:30] = (255, 0, 0)
    arr[-30:] = (0, 0, 255)
    Image.fromarray(arr).save(root / "tall.png")
    (root / "tall.txt").write_text("a person")
    pixels = data.open_dataset(root, split=None, size="20x30")[0][0]  # 60x120 -> 20x40 -> the centre 20x30
    assert pixels.shape == (3, 30, 20)
    red, blue = torch.tensor([1.0, -1, -1]).view(3, 1), torch.tensor([-1.0, -1, 1]).view(3, 1)
    assert (pixels[:, 0] - red).abs().max() < 0.05 and (pixels[:, -1] - blue).abs().max() < 0.05  # rows 15, 104
    assert (pixels[:, 14:16] > 0.95).all()  # the middle: white
    square = data.open_dataset(root, split=None, size=20)[0][0]  # 20x40 -> the centre 20x20: white but its edges
    assert square.shape == (3, 20, 20) and (square[:, 2:-2] > 0.95).all() and square.mean() > 0.9
    wide = data.open_dataset(root, split=None, size="30x20")[0][0]  # landscape from portrait: 30x60 -> rows 20..39
    assert wide.shape == (3, 20, 30) and (wide > 0.95).all()
    upscaled = data.open_dataset(root, split=None, size="64x96").converted.counts  # 60 px wide < 64: upscaled
    assert upscaled == {"smaller than 64x96 px → upscaled": 1}
    world = data.open_dataset("world", "test", "16x24")[3][0]  # drawn square at 24 px, then its centre 16 columns
    assert world.shape == (3, 24, 16) and torch.equal(world, data.open_dataset("world", "test", 24)[3][0][:, :, 4:20])


def test_parse_res():
    assert data.parse_res(512) == data.parse_res("512") == (512, 512)
    assert data.parse_res("512x768") == data.parse_res(" 512 X 768 ") == data.parse_res("512×768") == (512, 768)
    assert data.res_name((512, 512)) == 512 and data.res_name((512, 768)) == "512x768"
    for bad in ["", "512x", "x768", "0x768", "512x0", "0", "-512", "51.2", "512x768x2", "512,768", "big"]:
        with pytest.raises(ValueError, match=r"give WIDTHxHEIGHT in pixels \(e\.g\. 512x768\), or one number"):
            data.parse_res(bad)

def test_caption_pairs_folder(tmp_path):
    root = tmp_path / "pairs"
    (root / "sub").mkdir(parents=True)
    for name in ["a", "b", "sub/c", "nocap"]:
        rgb(root / f"{name}.jpg")
    for name in ["a", "b", "sub/c", "orphan"]:
        (root / f"{name}.txt").write_text(f"caption {name}\n")
    (root / "b.txt").write_bytes(b"caf\xe9")
    ds = data.open_dataset(root, split=None, size=16)
    assert sorted(ds.captions) == ["caption a", "caption sub/c"]
    assert ds.skipped.counts == {"image without caption": 1, "caption without image": 1,
                                 "caption file not valid UTF-8": 1}


def test_long_captions_are_kept_and_counted(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for i, words in enumerate([5, 80, 200]):
        rgb(root / f"{i}.jpg", seed=i)
        (root / f"{i}.txt").write_text(" ".join(["word"] * words))
    ds = data.open_dataset(root, split=None, size=16)
    words_plus_bos_eos = lambda texts: [len(t.split()) + 2 for t in texts]  # stands in for clip.Tokenizer.lengths
    assert len(ds) == 3 and "truncated 2: caption longer than 77 tokens" in ds.report(words_plus_bos_eos)[-1]
    assert not any("truncated" in line for line in ds.report())


def test_empty_or_missing_folder_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="no images found"):
        data.open_dataset(tmp_path / "empty")
    with pytest.raises(data.DataError, match="prepare deepfashion"):
        data.open_dataset("fashion_woman", root=tmp_path)
    with pytest.raises(data.DataError, match="no such folder"):
        data.open_dataset(tmp_path / "nope")
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "metadata.jsonl").write_text('{"file_name": "x.jpg", "text": "gone"}\n')
    with pytest.raises(data.DataError, match="missing image"):
        data.open_dataset(tmp_path / "allbad")


def test_decode_failure_at_load_falls_back_and_is_counted(tmp_path, capsys):
    root = tmp_path / "set"
    root.mkdir()
    for i in range(3):
        rgb(root / f"{i}.png", seed=i)
        (root / f"{i}.txt").write_text(f"image {i}")
    ds = data.open_dataset(root, split=None, size=16)
    expected = ds[2]
    (root / "1.png").write_bytes((root / "1.png").read_bytes()[:60] + b"\0" * 200 + b"IEND\xaeB`\x82")
    pixels, caption = ds[1]  # damaged after indexing: the next item stands in, deterministically
    assert caption == expected[1] and torch.equal(pixels, expected[0])
    assert ds.skipped.counts["unreadable image (found while loading)"] == 1
    assert "skipped unreadable image" in capsys.readouterr().err


def test_split_is_seeded_stable_and_honoured(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for i in range(60):
        (root / f"{i}.txt").write_text(f"caption {i}")
        rgb(root / f"{i}.png", 8, 8, seed=i)
    train = data.open_dataset(root, "train", size=8, seed=0)
    test = data.open_dataset(root, "test", size=8, seed=0)
    again = data.open_dataset(root, "test", size=8, seed=0)
    other = data.open_dataset(root, "test", size=8, seed=1)
    assert test.items == again.items and test.items != other.items
    assert not set(train.items) & set(test.items) and len(train) + len(test) == 60
    assert 0 < len(test) < 20
    assert [data.split_of(n, 0) for n, _ in test.items] == ["test"] * len(test)
    # a split column in metadata.jsonl is used as given
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"c{i}", "split": "test" if i < 5 else "train"}) + "\n"
        for i in range(60)))
    assert sorted(data.open_dataset(root, "test", size=8).captions) == [f"c{i}" for i in range(5)]
    assert "split from metadata.jsonl" in data.open_dataset(root, "test", size=8).report()[0]


def test_group_keeps_its_rows_in_one_split(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    rows = []
    for i in range(180):  # 60 garments, 3 views each
        rgb(root / f"{i}.png", 8, 8, seed=i)
        rows.append({"file_name": f"{i}.png", "text": f"garment {i // 3} view {i % 3}", "group": f"g{i // 3}"})
    rows[0]["split"] = "test"  # the group's other rows, without a split, follow it
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, test = (data.open_dataset(root, split, size=8) for split in ("train", "test"))
    garments = lambda ds: {c.split()[1] for c in ds.captions}
    assert len(train) + len(test) == 180 and len(garments(test)) >= 2
    assert not garments(train) & garments(test)
    assert {f"garment 0 view {v}" for v in range(3)} <= set(test.captions)
    assert "split seeded by group" in test.report()[0] and "warning" not in test.report()[0]
    rows[1]["split"] = "train"  # metadata's own split column splits group g0: kept as given, but said
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert "warning: 1 groups have rows in both train and test (e.g. 'g0')" in data.open_dataset(root, "test", 8).report()[0]


def test_a_split_without_rows_is_one_clear_error(tmp_path):
    root = tmp_path / "set"
    root.mkdir()
    for i in range(5):
        rgb(root / f"{i}.png", 8, 8, seed=i)
    (root / "metadata.jsonl").write_text("".join(
        json.dumps({"file_name": f"{i}.png", "text": f"c{i}", "split": "train"}) + "\n" for i in range(5)))
    assert len(data.open_dataset(root, "train", size=8)) == 5
    with pytest.raises(data.DataError, match='no test images: all 5 usable rows are in train .split from metadata.jsonl.. '
                                             'Give some rows "split": "test" in metadata.jsonl; train.py --eval-every 0'):
        data.open_dataset(root, "test", size=8)


def test_renderer_draws_every_attribute_distinctly():
    # With the same pose, changing any one attribute changes many pixels, even at 32 px.
    def render(kind="dress", colour="blue", pattern="plain"):
        return data.render_garment(kind, colour, pattern, 32, np.random.default_rng(0)).astype(float)
    for attribute, values in [("kind", data.SHAPES), ("colour", data.COLOURS), ("pattern", data.PATTERNS)]:
        for a, b in itertools.combinations(values, 2):
            assert np.abs(render(**{attribute: a}) - render(**{attribute: b})).mean() > 8, (a, b)


def test_world_pixels_separate_colours_by_nearest_neighbour():
    torch.manual_seed(0)
    train, test = data.WorldDataset("train", 16), data.WorldDataset("test", 16)
    xs = torch.stack([train[i][0] for i in range(2000)]).flatten(1)
    ys = torch.stack([test[i][0] for i in range(60)]).flatten(1)
    nearest = torch.cdist(ys, xs).argmin(1)
    same_colour = [train.label(j)["colour"] == test.label(i)["colour"] for i, j in enumerate(nearest.tolist())]
    assert sum(same_colour) / len(same_colour) > 0.3  # chance is 1/10; measured 0.55


def test_dataloader_with_workers(tmp_path):
    metadata_folder(tmp_path / "set")
    for ds in [data.open_dataset(tmp_path / "set", split=None, size=16), data.open_dataset("demo", "test", 16)]:
        loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2)
        batches = list(loader)
        assert sum(len(c) for _, c in batches) == len(ds)
        assert torch.equal(batches[0][0], torch.stack([ds[i][0] for i in range(4)]))
        assert list(batches[0][1]) == [ds[i][1] for i in range(4)]


def deepfashion_release(src):
    (src / "images").mkdir(parents=True)
    captions = {}
    for i, name in enumerate(["MEN-Denim-id_01-01_1_front.jpg", "MEN-Tees-id_02-01_1_front.jpg",
                              "WOMEN-Dresses-id_03-01_1_front.jpg", "WOMEN-Skirts-id_04-02_7_additional.jpg"]):
        rgb(src / "images" / name, seed=i)
        captions[name] = f"The person wears garment {i}."
    for name in odd_images(src / "images"):  # used as they are: conversion happens at load time
        (src / "images" / name).rename(src / "images" / f"WOMEN-{name}")
        captions[f"WOMEN-{name}"] = "An unusual image."
    for name in bad_images(src / "images"):
        (src / "images" / name).rename(src / "images" / f"WOMEN-{name}")
        captions[f"WOMEN-{name}"] = "A broken image."
    rgb(src / "images" / "MEN-nocaption.jpg")
    rgb(src / "images" / "WOMEN-empty.jpg")
    captions["WOMEN-empty.jpg"] = "  "
    captions["WOMEN-missing.jpg"] = "A caption without an image."
    (src / "captions.json").write_text(json.dumps(captions, indent=2))


def test_prepare_deepfashion(tmp_path, capsys):
    deepfashion_release(tmp_path / "src")
    out = tmp_path / "data"
    assert prepare.main(["deepfashion", "--src", str(tmp_path / "src"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fashion_man: 2 images" in printed and "fashion_woman: 7 images" in printed
    for line in ["skipped 2: unreadable image", "skipped 1: image without caption",
                 "skipped 1: caption without image", "skipped 1: empty caption"]:
        assert line in printed
    rows = [json.loads(line) for line in (out / "fashion_woman" / "metadata.jsonl").read_text().splitlines()]
    assert {r["split"] for r in rows} <= {"train", "test"}
    assert all((out / "fashion_woman" / r["file_name"]).is_file() for r in rows)
    assert all(r["file_name"].startswith("images/WOMEN-") for r in rows)
    ds = data.open_dataset("fashion_woman", split=None, size=16, root=out)
    assert len(ds) == 7 and not ds.skipped.counts and len(ds.converted.counts) == 5
    first = (out / "fashion_man" / "metadata.jsonl").read_text()
    prepare.main(["deepfashion", "--src", str(tmp_path / "src"), "--out", str(out)])  # rerun: same
    assert (out / "fashion_man" / "metadata.jsonl").read_text() == first


def test_prepare_deepfashion_keeps_each_garment_in_one_split(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    captions, views = {}, ["1_front", "2_side", "3_back", "4_full", "7_additional"]
    for g in range(30):  # the release's naming: <GENDER>-<Category>-id_<8 digits>-<set>_<view>.jpg
        for k, view in enumerate(views):
            name = f"WOMEN-Dresses-id_{g:08d}-{1 + k % 2:02d}_{view}.jpg"
            rgb(src / "images" / name, 8, 8, seed=g)
            captions[name] = f"Garment {g}."
    (src / "captions.json").write_text(json.dumps(captions))
    prepare.main(["deepfashion", "--src", str(src), "--out", str(tmp_path / "data")])
    rows = [json.loads(line) for line in (tmp_path / "data" / "fashion_woman" / "metadata.jsonl").read_text().splitlines()]
    split_of_garment = {}
    for r in rows:
        assert r["group"] == "id_" + r["file_name"].split("id_")[1][:8]
        split_of_garment.setdefault(r["group"], set()).add(r["split"])
    assert len(rows) == 150 and len(split_of_garment) == 30
    assert all(len(s) == 1 for s in split_of_garment.values())  # no garment in both splits
    assert {"train"} in split_of_garment.values() and {"test"} in split_of_garment.values()


def test_prepare_deepfashion_missing_release_is_clear(tmp_path, capsys):
    assert prepare.main(["deepfashion", "--src", str(tmp_path)]) == 1
    assert "captions.json not found" in capsys.readouterr().err


def test_prepare_products(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "data"
    (src / "images").mkdir(parents=True)
    csv = ["id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName",
           "15970,Men,Apparel,Topwear,Shirts,Navy Blue,Fall,2011,Casual,Turtle Check Men Navy Blue Shirt",
           "39386,Men,Apparel,Bottomwear,Jeans,Blue,Summer,2012,Casual,Peter England Men Party Blue Jeans",
           "59263,Women,Accessories,Watches,Watches,Silver,Winter,2016,Casual,Titan Women Silver, Gold Watch, Set",
           "21379,Men,Apparel,Bottomwear,Track Pants,Black,Fall,2011,Casual,",
           "53759,Men,Apparel,Topwear,Tshirts,Grey,Summer,2012,Casual,Puma Men Grey T-shirt",
           "1855,Men,Apparel,Topwear,Tshirts,Grey,Summer",
           "1163,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Sports,Sp\xe9cial Tee",
           "9999,Men,Apparel,Topwear,Tshirts,Blue,Summer,2011,Sports,Corrupt Tee"]
    raw = "\n".join(csv).encode("utf-8").replace("Sp\xe9cial".encode(), b"Sp\xe9cial")  # one Latin-1 line
    (src / "styles.csv").write_bytes(raw + b"\n")
    for i, id_ in enumerate(["15970", "39386", "59263", "21379", "1855", "1163", "777"]):
        rgb(src / "images" / f"{id_}.jpg", seed=i)
    (src / "images" / "9999.jpg").write_bytes(b"not an image at all")
    assert prepare.main(["products", "--src", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ecommerce_product: 3 images" in printed
    for line in ["skipped 3: image without caption", "skipped 1: caption without image",
                 "skipped 1: empty caption", "skipped 1: styles.csv line not valid UTF-8",
                 "skipped 1: styles.csv line with too few columns", "skipped 1: unreadable image"]:
        assert line in printed
    rows = {r["id"]: r for r in map(json.loads, (out / "ecommerce_product" / "metadata.jsonl").read_text().splitlines())}
    assert sorted(rows) == ["15970", "39386", "59263"]
    assert rows["59263"]["text"] == "Titan Women Silver, Gold Watch, Set"
    assert rows["59263"]["usage"] == "Casual" and rows["15970"]["baseColour"] == "Navy Blue"
    assert all(r["split"] == data.split_of(i, 0) for i, r in rows.items())
    ds = data.open_dataset("ecommerce_product", split=None, size=16, root=out)
    assert sorted(ds.captions) == sorted(r["text"] for r in rows.values())


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "tools.prepare", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "deepfashion" in result.stdout and "--src" in result.stdout


def as_uint8(pixels):
    return ((pixels.permute(1, 2, 0) + 1) * 127.5).round().numpy()  # (H, W, 3) in 0..255


def garment_rows(img):
    """Per row, the pixels that differ from the row's background (column 0: no garment reaches it)."""
    return [row[np.abs(row - row[0]).sum(1) > 60] for row in img]


def test_world_and_domain_are_deterministic_with_disjoint_splits():
    for name, sizes in [("world", data.WorldDataset.sizes), ("demo", data.DomainDataset.sizes)]:
        splits = {s: data.open_dataset(name, s, size=16) for s in ("train", "val", "test")}
        assert {s: len(ds) for s, ds in splits.items()} == sizes
        again = data.open_dataset(name, "test", size=16)
        assert all(torch.equal(splits["test"][i][0], again[i][0]) for i in range(0, 200, 37))
        assert not torch.equal(data.open_dataset(name, "test", size=16, seed=1)[5][0], again[5][0])
        everything = data.open_dataset(name, None, size=16)  # train, then val, then test
        assert len(everything) == sum(sizes.values())
        assert torch.equal(everything[sizes["train"] + 3][0], splits["val"][3][0])
        assert everything.label(len(everything) - 1) == splits["test"].label(sizes["test"] - 1)
        seen = {}  # every image of the three streams (the world's train: its first 2000) is distinct
        for s, ds in splits.items():
            for i in range(min(len(ds), 2000)):
                seen.setdefault(ds[i][0].numpy().tobytes(), (s, i))
        assert len(seen) == sum(min(n, 2000) for n in sizes.values())
        with pytest.raises(IndexError):
            splits["val"][sizes["val"]]
    with pytest.raises(ValueError, match="split must be one of train, val, test"):
        data.open_dataset("world", "validation")
    assert "demo: 200 synthetic test images" in data.open_dataset("demo", "test", size=16).report()[0]


def test_world_labels_agree_with_captions_and_pixels():
    ds = data.open_dataset("world", "test", size=32)
    labels = [ds.label(i) for i in range(len(ds))]
    assert ds.captions[:50] == [ds[i][1] for i in range(50)] == [data.caption(l) for l in labels[:50]]
    for attribute, values in [("kind", data.SHAPES), ("colour", data.COLOURS), ("pattern", data.PATTERNS)]:
        assert {l[attribute] for l in labels} == set(values)  # 1000 draws reach every value
    assert {l["hem"] for l in labels} == {"none"} and not any("hem" in c for c in ds.captions)
    assert data.caption({"kind": "boots", "colour": "orange", "pattern": "plain", "hem": "none"}) == \
        "a pair of plain orange boots"
    plain = [i for i, l in enumerate(labels) if l["pattern"] == "plain"][:30]
    for i in plain:  # a plain garment's pixels have its colour (tinted by at most 15 per channel)
        img = as_uint8(ds[i][0])
        median = np.median(np.concatenate(garment_rows(img)), 0)
        assert np.abs(median - data.COLOURS[labels[i]["colour"]]).max() <= 16, (i, labels[i], median)


def test_domain_captions_name_the_hem_and_look_alikes_differ_only_in_it():
    assert not set(data.DOMAIN_COLOURS) & set(data.HEMS) and set(data.DOMAIN_KINDS) <= set(data.SHAPES)
    for split in ("train", "val", "test"):
        ds = data.open_dataset("demo", split, size=32)
        labels = [ds.label(i) for i in range(len(ds))]
        assert ds.captions == [data.caption(l) for l in labels]
        groups = {}
        for l, c in zip(labels, ds.captions):
            assert l["kind"] in data.DOMAIN_KINDS and l["colour"] in data.DOMAIN_COLOURS
            assert c.endswith(f" with a {l['hem']} hem") and l["hem"] in data.HEMS
            groups.setdefault(c.rsplit(" with a ", 1)[0], []).append(l["hem"])
        # every garment comes with each hem: its look-alikes' captions differ only in the hem's colour
        assert all(sorted(hems) == sorted(list(data.HEMS) * (len(hems) // len(data.HEMS))) for hems in groups.values())
        assert len(groups) > len(ds) // len(data.HEMS) / 2  # of 126 garments, groups repeat a few (seed 0: 70 of 100)
    for i in range(0, 200, 7):  # the row above the silhouette's lowest holds the hem's colour
        img = as_uint8(ds[i][0])
        rows = [r for r in garment_rows(img) if len(r)]
        hem = np.median(rows[-2], 0)
        assert np.abs(hem - data.HEMS[labels[i]["hem"]]).max() <= 40, (i, labels[i], hem)
    # the studio background is a grey gradient, darker downwards; the world's is light and flat
    corner = as_uint8(ds[0][0])[:, 0].mean(1)
    assert corner[0] - corner[-1] > 40 and corner[0] < 200
    world = as_uint8(data.open_dataset("world", "test", size=32)[0][0])[:, 0].mean(1)
    assert world.min() > 200 and world.max() - world.min() < 3
