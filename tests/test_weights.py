import pytest
import torch
from torch import nn

from weights import WeightsError, find_weights, load_strict, read_safetensors, save_safetensors


def test_load_strict_names_bad_tensors():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    del sd["0.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["1.weight"] = torch.zeros(5, 5)
    with pytest.raises(WeightsError) as e:
        load_strict(model, sd, "x.safetensors")
    msg = str(e.value)
    assert "missing (1):\n    0.bias" in msg
    assert "unexpected (1):\n    extra.weight" in msg
    assert "1.weight: file (5, 5), model (2, 4)" in msg


def test_pickle_refused_never_opened(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"not even a pickle")  # never read: refused by name
    with pytest.raises(WeightsError, match="(?s)pickle checkpoints are refused.*weights_only=True"):
        read_safetensors(p)
    with pytest.raises(WeightsError, match="refused"):
        find_weights(tmp_path, ["model.safetensors"])


def test_truncated_safetensors_is_clear(tmp_path):
    p = tmp_path / "model.safetensors"
    save_safetensors({"a": torch.randn(100)}, p)
    p.write_bytes(p.read_bytes()[:-50])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        read_safetensors(p)
