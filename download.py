"""The one-time download of the pretrained weights, SD 1.5 and CLIP ViT-L/14: resumable, checked (size, sha256),
and offline one WeightsError that names every missing file and where to put it."""
import hashlib
import http.client
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from safetensors import safe_open

from weights import PICKLE_SUFFIXES, WeightsError, refuse_pickle

# Hugging Face repo -> the files we need; <weights dir>/<repo name>/ is then a diffusers / transformers folder.
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
CLIP_REPO = "openai/clip-vit-large-patch14"
WEIGHT_FILES = {
    SD15_REPO: ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "text_encoder/model.safetensors",
                "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer_config.json",
                "tokenizer/special_tokens_map.json"],
    CLIP_REPO: ["config.json", "model.safetensors"],
}
PIPELINE = ("model_index.json", "unet", "vae", "text_encoder")  # what a diffusers pipeline folder holds, at least


def weights_dir(path=None):
    return Path(path or os.environ.get("UNIDIFF_WEIGHTS") or "weights")


def _present(path):
    # A half-precision variant placed by hand (`x.fp16.safetensors`) serves as well: we train in fp32 either way.
    return path.is_file() or (path.suffix == ".safetensors" and path.with_suffix(".fp16.safetensors").is_file())


def ensure_weights(path=None, base_url=None, files=WEIGHT_FILES):
    """{repo: folder} of `files`, each missing one fetched from <base_url or $HF_ENDPOINT>/<repo>/resolve/main/."""
    root = weights_dir(path)
    base = (base_url or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    folders = {repo: root / repo.split("/")[-1] for repo in files}
    todo = [(repo, f) for repo, fs in files.items() for f in fs if not _present(folders[repo] / f)]
    for i, (repo, f) in enumerate(todo):
        url = f"{base}/{repo}/resolve/main/{f}"
        try:
            download(url, folders[repo] / f)
        except (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException) as e:
            why = (f"{url}: HTTP {e.code} {e.reason}" if isinstance(e, urllib.error.HTTPError)  # the server said no
                   else f"cannot download {url} ({getattr(e, 'reason', e)})")
            raise WeightsError(f"{why}.\n" + _place_message(root, folders, todo[i:])) from None
    return folders


def pretrained(path=None, base_url=None):
    """(SD 1.5, CLIP ViT-L/14) for UniDiff.from_pretrained from --weights: a weights folder, a diffusers pipeline folder
    (model_index.json: read as it is) or an SD 1.x single file. CLIP-L comes from the weights folder, never from
    beside a file or inside someone's pipeline folder (docs/training.md)."""
    clip_only = {CLIP_REPO: WEIGHT_FILES[CLIP_REPO]}
    if path is not None and Path(path).suffix in (".safetensors", *PICKLE_SUFFIXES):
        file = Path(path)
        if not file.is_file():  # a typo must not become the folder that the full download lands in
            raise WeightsError(f"{file}: no such file")
        if file.suffix in PICKLE_SUFFIXES:
            refuse_pickle(file)
        return file, ensure_weights(None, base_url, clip_only)[CLIP_REPO]
    if path is not None and all((Path(path) / f).exists() for f in PIPELINE):
        clip = Path(path) / "clip"  # not SD 1.5's folder inside it: this is the pipeline
        return Path(path), clip if clip.is_dir() else ensure_weights(None, base_url, clip_only)[CLIP_REPO]
    root = weights_dir(path)
    sd_folder = root / SD15_REPO.split("/")[-1]
    if root.is_dir() and not all(_present(sd_folder / f) for f in WEIGHT_FILES[SD15_REPO]):
        singles = [f for f in sorted(root.glob("*.safetensors")) if _is_sd_single_file(f)]
        if len(singles) > 1:
            raise WeightsError(f"{root} holds {len(singles)} SD single-file checkpoints "
                               f"({', '.join(f.name for f in singles)}): choose one with --weights FILE")
        if singles:
            return singles[0], ensure_weights(root, base_url, clip_only)[CLIP_REPO]
        if ckpts := sorted(root.glob("*.ckpt")):  # the file most users have: say how to use it, never skip it
            refuse_pickle(ckpts[0])
    folders = ensure_weights(root, base_url)
    return folders[SD15_REPO], folders[CLIP_REPO]


def _is_sd_single_file(path):
    """Whether a safetensors file holds an original-layout SD UNet (reads the header only)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return any(k.startswith("model.diffusion_model.") for k in f.keys())
    except Exception as e:  # a truncated download among the weights is worth saying, not skipping
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def _place_message(root, folders, missing):
    lines = [f"  {folders[repo] / f}    <- https://huggingface.co/{repo}/resolve/main/{f}" for repo, f in missing]
    return (f"The pretrained weights are not in {root}/ (set --weights DIR or $UNIDIFF_WEIGHTS). "
            f"Place these files ({len(missing)}; a .fp16.safetensors variant of a weights file also works):\n"
            + "\n".join(lines) + "\nor run again with network access (a partial download resumes). "
            "`python train.py --data demo` needs no weights.")


def _linked_info(url):
    """(size, sha256) or Nones from the hub's un-redirected HEAD: an LFS file's `X-Linked-Etag` is its sha256."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None
    try:
        with urllib.request.build_opener(NoRedirect).open(urllib.request.Request(url, method="HEAD"), timeout=30) as r:
            headers = r.headers
    except urllib.error.HTTPError as e:
        if e.code not in (301, 302, 303, 307, 308):
            raise
        headers = e.headers
    etag = (headers.get("X-Linked-Etag") or "").strip('"').removeprefix("W/").strip('"').lower()
    size = headers.get("X-Linked-Size")
    return (int(size) if size else None), (etag if re.fullmatch(r"[0-9a-f]{64}", etag) else None)


def download(url, dest, chunk=1 << 20):
    """Fetch `url` to `dest` via `dest.part` (resumed by a Range request), check size and sha256, rename into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    size, sha = _linked_info(url)
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        r = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code != 416:  # 416: nothing left to send, the .part may already be whole
            raise
        r, size = None, size or _total(e.headers.get("Content-Range"))
    if r is not None:
        if r.status == 200:
            have = 0  # the server ignored the Range: start over
        total = _total(r.headers.get("Content-Range")) or (
            have + int(r.headers["Content-Length"]) if r.headers.get("Content-Length") else None)
        if size is not None and total is not None and total != size:
            raise WeightsError(f"{url}: the server announced {size} bytes but sends {total}")
        size = size or total
        with open(part, "ab" if have else "wb") as f, r:
            done, t0, shown = have, time.time(), None
            while block := r.read(chunk):
                f.write(block)
                done += len(block)
                shown = _progress(dest.name, done, size, have, t0, shown)
    got = part.stat().st_size
    if size is not None and got != size:
        if got > size:
            part.unlink()  # cannot be a prefix of the right file: start clean next time
        raise WeightsError(f"{dest}: {'incomplete' if got < size else 'too large'} after download ({got} bytes, "
                           f"expected {size}); run again to {'resume' if got < size else 'download it afresh'}")
    if sha is not None:
        with open(part, "rb") as f:
            h = hashlib.file_digest(f, "sha256")
        if h.hexdigest() != sha:
            part.unlink()  # corrupt: resuming it would never fix it
            raise WeightsError(f"{dest}: sha256 mismatch (got {h.hexdigest()}, expected {sha}); "
                               "the partial file was removed, run again to download it afresh")
    os.replace(part, dest)  # atomic: `dest` exists only when complete and checked
    return dest


def _total(content_range):
    """TOTAL from a "bytes START-END/TOTAL" or "bytes */TOTAL" header, or None."""
    tail = (content_range or "").rpartition("/")[2]
    return int(tail) if tail.isdigit() else None


def _progress(name, done, size, start, t0, shown):
    """A progress line: redrawn in place on a terminal, one per 10 % (or 100 MB) in a log."""
    tty = sys.stderr.isatty()
    mark = done * 10 // size if size else done // (100 << 20)
    if mark == shown and not tty:
        return shown
    rate = (done - start) / max(time.time() - t0, 1e-6) / 2**20
    left = f"/{size / 2**20:.1f} MB, {(size - done) / 2**20 / max(rate, 1e-6):.0f}s left" if size else " MB"
    cr, end = ("\r", "\n" if size and done >= size else "") if tty else ("", "\n")
    print(f"{cr}  {name}: {done / 2**20:.1f}{left} ({rate:.1f} MB/s)", end=end, file=sys.stderr, flush=True)
    return mark
