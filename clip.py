"""CLIP: text tower, vision tower, BPE tokenizer and image preprocessing.

Module names are transformers' keys (CLIPModel / CLIPTextModel): their safetensors load strictly, unrenamed.
SD conditions on `text_hidden` (B, 77, W), ITC/RSC use `encode_text`. The modules need only torch and einops."""
import gzip
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from PIL import Image
from torch.utils.checkpoint import checkpoint

from weights import WeightsError, find_weights, load_strict, read_config, read_safetensors, save_model

# -----------------------------------------------------------------------------
# Model


def maybe_ckpt(on, fn, *args):
    """fn(*args), recomputed in backward instead of stored when `on` (the same 3 lines as in unet.py and vae.py)."""
    return checkpoint(fn, *args, use_reentrant=False) if on and torch.is_grad_enabled() else fn(*args)


ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu}  # OpenAI's, OpenCLIP's


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads = c.num_attention_heads
        W = c.hidden_size
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(W, W) for _ in range(4))

    def forward(self, x, causal):
        split = lambda t: rearrange(t, "b t (h d) -> b h t d", h=self.heads)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, heads, T, d)
        return self.out_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        if c.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {c.hidden_act!r} not supported (use one of {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = Attention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, causal):
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_hidden_layers))

    def forward(self, x, causal, ckpt):
        for layer in self.layers:
            x = maybe_ckpt(ckpt, layer, x, causal)
        return x


class TextEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, ids):
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]  # (B, L, W)


class TextTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = TextEmbeddings(c)
        self.encoder = Encoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids, ckpt):
        return self.final_layer_norm(self.encoder(self.embeddings(ids), causal=True, ckpt=ckpt))  # (B, L, W)


class VisionEmbeddings(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.image_size = c.image_size
        self.class_embedding = nn.Parameter(torch.randn(c.hidden_size) * c.hidden_size**-0.5)
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, c.patch_size, stride=c.patch_size, bias=False)
        self.position_embedding = nn.Embedding((c.image_size // c.patch_size) ** 2 + 1, c.hidden_size)

    def forward(self, pixels):
        if pixels.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"this CLIP vision tower takes {self.image_size}x{self.image_size} pixels, "
                             f"got {tuple(pixels.shape[-2:])} (see clip.preprocess)")
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))  # (B, W, grid, grid)
        x = rearrange(x, "b c h w -> b (h w) c")  # (B, N, W): one token per patch, row by row
        x = torch.cat([self.class_embedding.expand(len(x), 1, -1).to(x.dtype), x], dim=1)  # (B, 1 + N, W)
        return x + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.pre_layrnorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)  # [sic], the public key
        self.encoder = Encoder(c)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixels, ckpt):
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)), causal=False, ckpt=ckpt)
        return self.post_layernorm(x[:, 0])  # (B, W): the class token


# Keys of a CLIPTextModel file saved without the `text_model.` prefix (and legacy SD files).
_TEXT_KEYS = ("embeddings.", "encoder.", "final_layer_norm.")


class CLIP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg  # a CLIPConfig (below)
        self.grad_ckpt = False  # recompute each transformer layer in backward (saves activation memory)
        self.text_model = TextTransformer(cfg.text)
        self.vision_model = VisionTransformer(cfg.vision) if cfg.vision else None
        D = cfg.projection_dim
        self.text_projection = nn.Linear(cfg.text.hidden_size, D, bias=False) if D else None
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, D, bias=False) if cfg.vision else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07))) if cfg.vision else None  # CLIP's init
        # CLIP's small-normal init (PyTorch's default gives N(0, 1) embeddings); class_embedding keeps its own.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def text_hidden(self, ids):
        """(B, L) token ids -> (B, L, W) final-LN hidden states: SD's UNet context."""
        return self.text_model(ids, ckpt=self.grad_ckpt)

    def pool_text(self, hidden, ids):
        """`text_hidden`'s output -> (B, D) projected embedding, so one text pass can serve IS and ITC."""
        if self.text_projection is None:
            raise ValueError("a text-only CLIP (e.g. SD's text_encoder) has no text_projection: load a full CLIP")
        # Pool at the first EOS: 49407 is the largest id, so argmax finds it (transformers' rule, either eos_token_id).
        return self.text_projection(hidden[torch.arange(len(ids), device=ids.device), ids.argmax(-1)])

    def encode_text(self, ids):
        """(B, L) token ids -> (B, D), projected, not normalised."""
        return self.pool_text(self.text_hidden(ids), ids)

    def encode_image(self, pixels):
        """(B, 3, H, W) CLIP-normalised pixels -> (B, D), projected, not normalised."""
        if self.vision_model is None:
            raise ValueError("this CLIP is a text encoder only: it has no vision tower. Load a full CLIP for images.")
        return self.visual_projection(self.vision_model(pixels, ckpt=self.grad_ckpt))

    @classmethod
    def from_state_dict(cls, sd, cfg=None, source="state dict"):
        """Build and strictly load; keys as transformers writes them, `text_model.` prefix optional."""
        sd = {("text_model." + k if k.startswith(_TEXT_KEYS) else k): v
              for k, v in sd.items() if not k.endswith("position_ids")}  # legacy buffers, not weights
        with torch.device("meta"):  # no time spent initialising weights that are overwritten
            model = cls(cfg or infer_config(sd))
        return load_strict(model.to_empty(device="cpu"), sd, source)

    def save(self, folder, text_only=False):
        """A folder transformers' CLIPModel opens; `text_only`: the text tower, a CLIPTextModel (SD's text_encoder)."""
        sd = self.text_model.state_dict(prefix="text_model.") if text_only else self.state_dict()
        save_model(folder, "model.safetensors", sd, self.cfg.to_json(text_only))


# -----------------------------------------------------------------------------
# Config, presets, shape inference, loading. Field names and defaults are transformers' (CLIPTextConfig /
# CLIPVisionConfig / CLIPConfig), so a partial config.json means exactly what it means to transformers.


@dataclass
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class VisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig | None = field(default_factory=VisionConfig)  # None: text tower only
    projection_dim: int | None = 512  # None: no text_projection (CLIPTextModel, SD's text_encoder)

    @classmethod
    def from_json(cls, d):
        """From a transformers config.json: CLIPConfig, CLIPTextConfig or CLIPTextModelWithProjection's."""
        pick = lambda kind, sub: kind(**{f.name: sub[f.name] for f in fields(kind) if f.name in sub})
        if "text_config" in d or "vision_config" in d:  # CLIPModel; old files repeat values in *_dict
            text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
            vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
            return cls(pick(TextConfig, text), pick(VisionConfig, vision), d.get("projection_dim", 512))
        if d.get("model_type", "clip_text_model") != "clip_text_model":
            raise WeightsError(f"config.json describes a {d.get('model_type')!r}, not a CLIP text or CLIP model")
        # SD's CLIPTextModel config carries projection_dim too, but that model has no projection.
        with_proj = "CLIPTextModelWithProjection" in d.get("architectures", [])
        return cls(pick(TextConfig, d), None, d.get("projection_dim", 512) if with_proj else None)

    def to_json(self, text_only=False):
        """transformers' config.json: CLIPModel, CLIPTextModel(WithProjection); `text_only`: SD's text_encoder."""
        text = {**asdict(self.text), "model_type": "clip_text_model"}
        if self.vision is None or text_only:
            if self.projection_dim is None or text_only:
                return {"architectures": ["CLIPTextModel"], **text}
            return {"architectures": ["CLIPTextModelWithProjection"], **text, "projection_dim": self.projection_dim}
        return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": self.projection_dim,
                "logit_scale_init_value": math.log(1 / 0.07), "text_config": text,
                "vision_config": {**asdict(self.vision), "model_type": "clip_vision_model"}}


PRESETS = {
    "vit-l/14": CLIPConfig(TextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12),
                           VisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                        num_attention_heads=16, patch_size=14), projection_dim=768),
    # CPU-sized, for tests and the demo; the real vocabulary so Tokenizer ids work.
    "tiny": CLIPConfig(TextConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
                       VisionConfig(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=32, patch_size=8), projection_dim=32),
}

# Shapes do not tell the number of heads: take a preset's for its width, else CLIP's 64-dim heads.
_HEADS = {t.hidden_size: t.num_attention_heads for c in PRESETS.values() for t in (c.text, c.vision)}


def infer_config(sd):
    """A CLIPConfig from the tensor shapes of a state dict with transformers key names."""
    if "text_model.embeddings.token_embedding.weight" not in sd:
        raise WeightsError("not a CLIP state dict: no text_model.embeddings.token_embedding.weight "
                           f"(first keys: {', '.join(list(sd)[:5])})")

    def tower(p):
        layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith(p + "encoder.layers."))
        mlp, width = sd[p + "encoder.layers.0.mlp.fc1.weight"].shape
        return dict(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                    num_attention_heads=_HEADS.get(width, max(1, width // 64)))

    text = TextConfig(vocab_size=sd["text_model.embeddings.token_embedding.weight"].shape[0],
                      max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                      **tower("text_model."))
    vision = None
    if "vision_model.embeddings.class_embedding" in sd:
        patch = sd["vision_model.embeddings.patch_embedding.weight"].shape[-1]
        grid = math.isqrt(sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)
        vision = VisionConfig(image_size=grid * patch, patch_size=patch, **tower("vision_model."))
    proj = sd.get("text_projection.weight")
    return CLIPConfig(text, vision, None if proj is None else proj.shape[0])


def load_clip(path):
    """A transformers CLIPModel or CLIPTextModel safetensors file, or the folder holding it."""
    file = find_weights(path, ["model.safetensors"])
    cfg = read_config(file)
    return CLIP.from_state_dict(read_safetensors(file), CLIPConfig.from_json(cfg) if cfg else None, source=str(file))


# -----------------------------------------------------------------------------
# Tokenizer: CLIP's BPE through the `tokenizers` library, the same pipeline as transformers'
# CLIPTokenizer, from OpenAI's merges file shipped in assets/.

BPE_FILE = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = 49406, 49407
LENGTH = 77  # tokens per caption: the text tower's 77 positions
# CLIP's pre-tokenisation: special tokens, contractions, letter runs, single digits, other runs.
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode():
    """GPT-2's byte -> printable character table: BPE runs on characters, never on raw bytes."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs + [256 + i for i in range(256 - len(bs))]
    bs = bs + [b for b in range(256) if b not in bs]
    return dict(zip(bs, map(chr, cs)))


def clip_bpe():
    """(vocab, merges): 512 byte symbols (alone and with `</w>`), one token per merge, then BOS, EOS."""
    merges = [tuple(line.split()) for line in gzip.open(BPE_FILE, "rt", encoding="utf-8").read().split("\n")[1:48895]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


class Tokenizer:
    """`tok(list_of_str) -> LongTensor (B, 77)`: BOS, tokens, EOS, padded with EOS, truncated keeping EOS."""

    def __init__(self):
        self.vocab, self.merges = clip_bpe()
        tk = tokenizers.Tokenizer(tokenizers.models.BPE(self.vocab, self.merges, unk_token="<|endoftext|>",
                                                        continuing_subword_prefix="", end_of_word_suffix="</w>"))
        tk.normalizer = tokenizers.normalizers.Sequence([  # CLIP's clean-up: NFC, one space, lower case
            tokenizers.normalizers.NFC(), tokenizers.normalizers.Replace(tokenizers.Regex(r"\s+"), " "),
            tokenizers.normalizers.Lowercase()])
        tk.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([
            tokenizers.pre_tokenizers.Split(tokenizers.Regex(PATTERN), behavior="removed", invert=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)])
        tk.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # written in a caption, they stay whole
        self.tk = tk

    def _tokens(self, texts):
        return [e.ids for e in self.tk.encode_batch([texts] if isinstance(texts, str) else list(texts),
                                                    add_special_tokens=False)]

    def __call__(self, texts):
        n = LENGTH - 2  # room for BOS and EOS
        return torch.tensor([[BOS] + t[:n] + [EOS] * (n + 1 - len(t[:n])) for t in self._tokens(texts)])

    def lengths(self, texts):
        """Token counts with BOS and EOS, before truncation: over LENGTH means truncated."""
        return [len(t) + 2 for t in self._tokens(texts)]

    def save(self, folder):
        """vocab.json, merges.txt and the configs: a `tokenizer/` folder transformers' CLIPTokenizer opens."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in self.merges) + "\n",
                                           encoding="utf-8")
        special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
                   "unk_token": "<|endoftext|>"}
        (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": LENGTH, "do_lower_case": True,
             "add_prefix_space": False, "errors": "replace", **special}, indent=2))


# -----------------------------------------------------------------------------
# Images

MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's training-set statistics, RGB
STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(im):
    """Any PIL mode -> RGB; transparency is composited on white, 16-bit scaled to 8-bit."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L"):
        im = Image.fromarray((np.asarray(im, dtype=np.float32) / 257).clip(0, 255).astype(np.uint8))
    if "A" in im.getbands() or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def resize_crop(im, size):
    """Scaled (bicubic) to just cover `size` (an int: a square; or (W, H)), then its centre cut out."""
    W, H = (size, size) if isinstance(size, int) else size
    w, h = im.size
    w, h = (W, int(W * h / w)) if W * h >= H * w else (int(H * w / h), H)  # transformers' rounding
    im = im.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - W) // 2, (h - H) // 2
    return im.crop((left, top, left + W, top + H))


def preprocess(images, size=224):
    """PIL image(s) -> (B, 3, size, size) float32: shorter side to `size` (bicubic), centre crop, mean/std."""
    images = [images] if isinstance(images, Image.Image) else images
    out = [np.asarray(resize_crop(to_rgb(im), size), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2) / 255  # (B, 3, size, size) in [0, 1]
    return (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
