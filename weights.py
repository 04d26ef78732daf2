"""Reading weights: safetensors only, loaded strictly, with errors that name the tensors.

Every loader goes through here, so a pickle is never unpickled and a wrong checkpoint fails the same, readable way."""
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


class WeightsError(ValueError):
    """A weights file that cannot be used as asked; the message says why and what to do."""


def find_weights(path, names):
    """`path` is a safetensors file, or a folder holding one of `names` or its .fp16 variant (tried in order)."""
    path, names = Path(path), [v for n in names for v in (n, n.replace(".safetensors", ".fp16.safetensors"))]
    if path.is_dir():
        for name in names:
            if (path / name).is_file():
                return path / name
        if pickles := [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]:
            refuse_pickle(pickles[0])
        raise WeightsError(f"{path}: no weights file here (looked for {', '.join(names)})")
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    return path


def refuse_pickle(path):
    # A pickle can run arbitrary code when loaded: we never open one a user downloaded.
    raise WeightsError(
        f"{path}: pickle checkpoints are refused (loading one can execute code). Convert it once, "
        "in an environment you trust, to safetensors:\n"
        "  python -c \"import torch, safetensors.torch as st; "
        f"sd = torch.load('{path}', map_location='cpu', weights_only=True); sd = sd.get('state_dict', sd); "
        f"st.save_file({{k: v.contiguous() for k, v in sd.items()}}, '{Path(path).with_suffix('.safetensors')}')\"\n"
        "or download the .safetensors release of the same model.")


def read_safetensors(path):
    """All tensors of one safetensors file, on the CPU."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several types for a bad header / truncation
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def read_config(path):
    path = Path(path)
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(cfg.read_text()) if cfg.is_file() else None


def load_strict(model, sd, source):
    """`model.load_state_dict(sd, strict=True)`, but the error names every bad tensor."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    misshaped = sorted(f"{k}: file {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
                       for k in own if k in sd and sd[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        def block(title, items, n=20):
            more = f"\n    ... and {len(items) - n} more" if len(items) > n else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:n]) + more if items else ""
        raise WeightsError(f"{source}: weights do not match {type(model).__name__}" + block("missing", missing)
                           + block("unexpected", unexpected) + block("mis-shaped", misshaped))
    model.load_state_dict(sd, strict=True)
    return model


def save_safetensors(sd, path, metadata=None):
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(path), metadata=metadata)


def save_model(folder, file, sd, config):
    """`folder/file` (the tensors `sd`) beside `config.json`: the folder layout of diffusers and transformers."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, folder / file, metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
