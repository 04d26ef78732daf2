"""The weights downloader, against a local server shaped like the Hugging Face hub.

The hub answers `/<repo>/resolve/main/<file>` with a redirect to its CDN carrying
`X-Linked-Size` and `X-Linked-Etag` (the sha256); the CDN honours HTTP Range requests.
"""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from download import CLIP_REPO, WEIGHT_FILES, download, ensure_weights, pretrained, weights_dir
from weights import WeightsError, save_safetensors


class Hub(BaseHTTPRequestHandler):
    files = {}      # "/repo/resolve/main/path" -> bytes
    ranges = []     # Range headers the CDN saw, in order
    cut = None      # send only this many bytes of the next body, then hang up
    bad_sha = False

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.do_GET(body=False)

    def do_GET(self, body=True):
        if self.path.startswith("/cdn/"):
            return self.serve(self.files["/" + self.path[5:]], body)
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        sha = hashlib.sha256(data + b"x" * self.bad_sha).hexdigest()
        self.send_response(302)
        self.send_header("Location", "/cdn" + self.path)
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def serve(self, data, body):
        start = 0
        if rng := self.headers.get("Range"):
            Hub.ranges.append(rng)
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        if body:
            out = data[start:]
            if Hub.cut is not None:
                out, Hub.cut = out[:Hub.cut], None
            self.wfile.write(out)


@pytest.fixture
def hub():
    Hub.files, Hub.ranges, Hub.cut, Hub.bad_sha = {}, [], None, False
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Timer(60, server.shutdown)  # bounded even if a test hangs
    stop.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    stop.cancel()
    server.shutdown()
    server.server_close()


def blob(n, seed=0):
    return bytes(torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8).tolist())


def test_interrupted_download_resumes_from_part(hub, tmp_path):
    data = blob(300_000)
    Hub.files["/org/m/resolve/main/unet/w.safetensors"] = data
    dest = tmp_path / "unet" / "w.safetensors"
    Hub.cut = 120_000  # the connection drops after 120 kB
    with pytest.raises(WeightsError, match="incomplete.*run again to resume"):
        download(f"{hub}/org/m/resolve/main/unet/w.safetensors", dest)
    part = dest.with_name("w.safetensors.part")
    assert not dest.exists() and part.stat().st_size == 120_000
    download(f"{hub}/org/m/resolve/main/unet/w.safetensors", dest)
    assert Hub.ranges == ["bytes=120000-"]  # only the rest was fetched
    assert dest.read_bytes() == data and not part.exists()


def test_checksum_mismatch_is_caught_and_part_removed(hub, tmp_path):
    Hub.files["/org/m/resolve/main/w.safetensors"] = blob(50_000)
    Hub.bad_sha = True
    dest = tmp_path / "w.safetensors"
    with pytest.raises(WeightsError, match="sha256 mismatch"):
        download(f"{hub}/org/m/resolve/main/w.safetensors", dest)
    assert not dest.exists() and not dest.with_name("w.safetensors.part").exists()


def test_oversized_part_is_caught_then_refetched(hub, tmp_path):
    data = blob(40_000)
    Hub.files["/org/m/resolve/main/w.safetensors"] = data
    dest = tmp_path / "w.safetensors"
    dest.with_name("w.safetensors.part").write_bytes(blob(45_000, seed=1))  # not a prefix of anything
    with pytest.raises(WeightsError, match="too large.*expected 40000"):
        download(f"{hub}/org/m/resolve/main/w.safetensors", dest)
    download(f"{hub}/org/m/resolve/main/w.safetensors", dest)
    assert dest.read_bytes() == data


def test_ensure_weights_fetches_once_into_repo_folders(hub, tmp_path, monkeypatch):
    files = {"org/sd": ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"], "org/clip": ["model.safetensors"]}
    for repo, fs in files.items():
        for i, f in enumerate(fs):
            Hub.files[f"/{repo}/resolve/main/{f}"] = blob(1000 + i, seed=i)
    monkeypatch.setenv("UNIDIFF_WEIGHTS", str(tmp_path / "w"))
    assert weights_dir() == tmp_path / "w" and weights_dir(tmp_path / "x") == tmp_path / "x"
    folders = ensure_weights(base_url=hub, files=files)
    assert folders == {"org/sd": tmp_path / "w" / "sd", "org/clip": tmp_path / "w" / "clip"}
    assert (folders["org/sd"] / "unet/diffusion_pytorch_model.safetensors").read_bytes() == blob(1001, seed=1)
    Hub.files.clear()  # a second call must not need the server
    assert ensure_weights(base_url=hub, files=files) == folders


def test_offline_names_every_missing_file_and_where(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    files = {"org/sd": ["unet/diffusion_pytorch_model.safetensors", "vae/config.json"], "org/clip": ["model.safetensors"]}
    (tmp_path / "sd" / "vae").mkdir(parents=True)
    (tmp_path / "sd" / "vae" / "config.json").write_text("{}")  # present: not asked for
    (tmp_path / "sd" / "unet").mkdir()
    with pytest.raises(WeightsError) as e:
        ensure_weights(tmp_path, base_url=f"http://127.0.0.1:{port}", files=files)
    msg = str(e.value)
    assert "Place these files (2;" in msg and "vae/config.json" not in msg
    assert f"{tmp_path}/sd/unet/diffusion_pytorch_model.safetensors" in msg
    assert "https://huggingface.co/org/clip/resolve/main/model.safetensors" in msg
    # a hand-placed fp16 variant counts as present
    (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=r"Place these files \(1;"):
        ensure_weights(tmp_path, base_url=f"http://127.0.0.1:{port}", files=files)


def test_single_file_in_folder_fetches_only_clip(hub, tmp_path):
    """With an SD single file in the weights folder, only CLIP ViT-L/14 (its vision tower) is downloaded."""
    save_safetensors({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, tmp_path / "v1-5-pruned-emaonly.safetensors")
    for i, f in enumerate(WEIGHT_FILES[CLIP_REPO]):
        Hub.files[f"/{CLIP_REPO}/resolve/main/{f}"] = blob(500 + i, seed=i)
    assert pretrained(tmp_path, base_url=hub) == (tmp_path / "v1-5-pruned-emaonly.safetensors",
                                                   tmp_path / "clip-vit-large-patch14")
    assert (tmp_path / "clip-vit-large-patch14" / "model.safetensors").read_bytes() == blob(501, seed=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip-vit-large-patch14", "v1-5-pruned-emaonly.safetensors"]
