"""LoRA (Hu et al. 2021): fine-tune a large model by training, for some of its nn.Linear layers (and 1x1 convs:
the same map at each pixel), a low-rank update of the weight instead of the weight itself (docs/training.md: what
trains, what is saved):

    y = W x + b + (α/r) · B A x        W (out, in) and b frozen;  A (r, in), B (out, r) trained;  r ≪ in, out

B starts at zero, so training starts from exactly the base model; A starts random (Kaiming-uniform, nn.Linear's
init, as the paper's code and peft do), else B's gradient, ∝ A x, would be zero too. Once trained, W + (α/r) B A is
a plain weight again (`merge`). A forward hook adds an adapter's output to its layer's, and the adapters are one
nn.ModuleDict keyed by kohya's names (the module's path with _ for .): the base model's state_dict is untouched, and
the adapters' is the file A1111, ComfyUI and diffusers read (`<name>.lora_down.weight` (A), `.lora_up.weight` (B),
`.alpha`)."""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn

# The layers that get adapters (--lora-targets), by the last parts of their names, UNet's and CLIP's.
# attention: the attention projections, as diffusers' SD LoRA scripts. kohya: sd-scripts' default for SD 1.x/2.x
# (networks/lora.py): every nn.Linear and 1x1 nn.Conv2d in the UNet's Transformer2DModels (the attention, proj_in/out,
# the feed-forward) and in the text encoder's CLIPAttention and CLIPMLP (fc1, fc2); the vision tower as the text one.
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")
TARGETS = {"attention": ATTENTION,
           "kohya": ATTENTION + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "fc1", "fc2")}
# kohya's prefixes: lora_unet_ + the UNet's module path, lora_te_ + the text encoder's (a CLIPTextModel's:
# text_model.encoder...). No SD tool has a CLIP vision tower: lora_clip_ + its path in a CLIPModel.
PREFIX = {"unet": "lora_unet_", "text": "lora_te_", "vision": "lora_clip_"}


class LoRA(nn.Module):
    """The trained low-rank update of one frozen nn.Linear `layer`, added to the layer's output by a hook. Of a 1x1
    nn.Conv2d: A and B are 1x1 convs too, kohya's conv shapes in the file, A (r, in, 1, 1) and B (out, r, 1, 1)."""

    def __init__(self, layer, rank, alpha, generator=None):
        super().__init__()
        kw = dict(bias=False, device=layer.weight.device, dtype=layer.weight.dtype)  # skip_init: initialised below
        out, cin = layer.weight.shape[:2]
        make = (lambda i, o: nn.utils.skip_init(nn.Conv2d, i, o, 1, **kw)) if isinstance(layer, nn.Conv2d) else (
            lambda i, o: nn.utils.skip_init(nn.Linear, i, o, **kw))
        self.lora_down, self.lora_up = make(cin, rank), make(rank, out)  # A (r, in), B (out, r)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)  # B = 0: at step 0 the layer is exactly the base one
        self.register_buffer("alpha", torch.tensor(float(alpha)))  # in the file: readers scale by α/r
        self.target = (layer,)  # a tuple, not a submodule: the base weights stay out of the adapters' state_dict
        self.on = True  # off while merged into the layer's weight
        layer.register_forward_hook(self.hook)

    def forward(self, x):  # (..., in) -> (α/r) B A x (..., out)
        return self.alpha / self.lora_down.weight.shape[0] * self.lora_up(self.lora_down(x))

    def hook(self, layer, args, y):  # y = W x + b  ->  W x + b + (α/r) B A x
        return y + self(args[0]) if self.on else y

    def delta(self):  # (α/r) B A (out, in): what merging adds to W (a conv's: as (out, in, 1, 1))
        up, down = self.lora_up.weight, self.lora_down.weight
        return (self.alpha / down.shape[0] * (up.flatten(1) @ down.flatten(1))).view(self.target[0].weight.shape)


def add_lora(model, parts, rank, alpha, generator=None, targets="attention"):
    """Adapters on the `targets` layers (TARGETS; frozen) of a UniDiff's `parts` -> ModuleDict {kohya's name: LoRA}."""
    layers, ends = {}, tuple("." + t for t in TARGETS[targets])
    for part in parts:
        net, under = (model.unet, "") if part == "unet" else (model.clip, f"{part}_model.")
        for name, m in net.named_modules():
            one = isinstance(m, nn.Linear) or isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
            if one and name.startswith(under) and ("." + name).endswith(ends):
                layers[PREFIX[part] + name.replace(".", "_")] = m.requires_grad_(False)
    return nn.ModuleDict({name: LoRA(layer, rank, alpha, generator) for name, layer in layers.items()})


@torch.no_grad()
def merge(adapters):
    """Fold each adapter into its layer, W <- W + (α/r) B A, and turn it off: the model is a plain one again."""
    for a in adapters.values():
        layer, = a.target
        layer.weight += a.delta().to(layer.weight.dtype)
        a.on = False


@torch.no_grad()
def unmerge(adapters, base):
    """The base weights {name: W} back into the adapted layers, the adapters on: training goes on from there."""
    for name, a in adapters.items():
        layer, = a.target
        layer.weight.copy_(base[name])
        a.on = True


@contextmanager
def merged(adapters):
    """Inside, the adapters merged (to save the model in its usual layouts); yields the base weights {name: W}
    (copies on the CPU). After, the base weights are back bit for bit (no W + ΔW - ΔW rounding) and the adapters on."""
    base = {name: a.target[0].weight.detach().to("cpu", copy=True) for name, a in adapters.items()}
    merge(adapters)
    try:
        yield base
    finally:
        unmerge(adapters, base)
