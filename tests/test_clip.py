"""CLIP parity with transformers on tiny random models saved as safetensors, loading, saving, preprocess."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import clip
from helpers import rel_err, repo_imports
from weights import WeightsError

TOL = 1e-5
CAPTIONS = ["a photo of a cat", "", "a long-sleeve RED floral dress, size M!", "two dogs " * 30]
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)  # mlp != 4*width
VISION = dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=3,
              image_size=32, patch_size=8)


def features(out):
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features (4.x: a tensor).
    return out if torch.is_tensor(out) else out.pooler_output


@torch.no_grad()
def jiggle(model, seed=0):
    """Random init leaves LayerNorms at 1/0 and biases at 0: perturb everything so every tensor matters."""
    torch.manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def hf_clip(act="quick_gelu", eos=49407, seed=0, **vision):
    torch.manual_seed(seed)
    cfg = transformers.CLIPConfig(text_config={**TEXT, "hidden_act": act, "eos_token_id": eos},
                                  vision_config={**VISION, "hidden_act": act, **vision}, projection_dim=24)
    return jiggle(transformers.CLIPModel(cfg), seed)


def hf_text(seed=0):
    torch.manual_seed(seed)
    return jiggle(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT)), seed)


@pytest.fixture(scope="module")
def ids():
    return clip.Tokenizer()(CAPTIONS)


def pixels(n=2, size=32):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


# eos_token_id=2 is the openai configs' value (argmax pooling); 49407 the newer first-EOS rule.
@pytest.mark.parametrize("act,eos", [("quick_gelu", 2), ("gelu", 49407)])
def test_parity_full_clip(tmp_path, ids, act, eos):
    ref = hf_clip(act, eos)
    ref.save_pretrained(tmp_path)
    ours = clip.load_clip(tmp_path).eval()
    assert ours.cfg.text.hidden_act == act and ours.cfg.vision.num_attention_heads == 3
    x = pixels()
    with torch.no_grad():
        errs = dict(text=rel_err(ours.encode_text(ids), features(ref.get_text_features(input_ids=ids))),
                    image=rel_err(ours.encode_image(x), features(ref.get_image_features(pixel_values=x))),
                    hidden=rel_err(ours.text_hidden(ids), ref.text_model(input_ids=ids).last_hidden_state))
    assert max(errs.values()) <= TOL, errs
    assert torch.equal(ours.logit_scale.detach(), ref.logit_scale.detach())


@pytest.mark.parametrize("prefix", ["text_model.", ""])
def test_parity_text_only_file(tmp_path, ids, prefix):
    """SD's text_encoder/model.safetensors: CLIPTextModel keys, with or without the prefix, legacy position_ids."""
    ref = hf_text()
    sd = {prefix + k: v.contiguous() for k, v in ref.state_dict().items()}
    sd[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(ref.config.to_json_string())  # SD's config: projection_dim, no projection
    ours = clip.load_clip(tmp_path / "model.safetensors").eval()
    assert ours.vision_model is None and ours.text_projection is None
    with torch.no_grad():
        assert rel_err(ours.text_hidden(ids), ref(input_ids=ids).last_hidden_state) <= TOL
    with pytest.raises(ValueError, match="text_projection"):
        ours.encode_text(ids)


def test_config_inferred_from_shapes(tmp_path, ids):
    ref = hf_clip(hidden_size=128, num_attention_heads=2)  # heads are not in the shapes: CLIP's 64-dim heads
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "model.safetensors")
    ours = clip.load_clip(tmp_path).eval()  # no config.json here
    v = ours.cfg.vision
    assert (v.hidden_size, v.num_attention_heads, v.intermediate_size) == (128, 2, 64)
    assert (v.image_size, v.patch_size) == (32, 8)
    assert ours.cfg.text.intermediate_size == 48 and ours.cfg.projection_dim == 24
    x = pixels()
    with torch.no_grad():
        assert rel_err(ours.encode_text(ids), features(ref.get_text_features(input_ids=ids))) <= TOL
        assert rel_err(ours.encode_image(x), features(ref.get_image_features(pixel_values=x))) <= TOL
    # the tiny preset round-trips through inference too (its head count comes from the preset)
    tiny = clip.CLIP(clip.PRESETS["tiny"])
    assert clip.infer_config(tiny.state_dict()) == clip.PRESETS["tiny"]


def test_load_error_names_bad_tensors(tmp_path):
    sd = {k: v.contiguous() for k, v in hf_clip().state_dict().items()}
    del sd["text_model.encoder.layers.1.mlp.fc2.bias"]
    sd["vision_model.extra.weight"] = torch.zeros(3)
    sd["visual_projection.weight"] = torch.zeros(24, 47)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(hf_clip().config.to_json_string())
    with pytest.raises(WeightsError) as e:
        clip.load_clip(tmp_path)
    msg = str(e.value)
    for name in ["text_model.encoder.layers.1.mlp.fc2.bias", "vision_model.extra.weight", "visual_projection.weight"]:
        assert name in msg
    with pytest.raises(WeightsError, match="not a CLIP"):
        clip.CLIP.from_state_dict({"conv_in.weight": torch.zeros(1)})


def test_saved_folder_opens_in_transformers(tmp_path, ids):
    torch.manual_seed(0)
    ours = jiggle(clip.CLIP(replace(clip.PRESETS["tiny"], vision=clip.VisionConfig(**VISION, hidden_act="gelu"))))
    ours.save(tmp_path / "full")
    ref, info = transformers.CLIPModel.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    x = pixels()
    with torch.no_grad():
        assert rel_err(ours.encode_text(ids), features(ref.get_text_features(input_ids=ids))) <= TOL
        assert rel_err(ours.encode_image(x), features(ref.get_image_features(pixel_values=x))) <= TOL
    assert clip.load_clip(tmp_path / "full").cfg == ours.cfg

    text_only = jiggle(clip.CLIP(replace(clip.PRESETS["tiny"], vision=None, projection_dim=None)))
    text_only.save(tmp_path / "text_encoder")
    assert all(k.startswith("text_model.") for k in text_only.state_dict())  # SD's text_encoder layout
    ref, info = transformers.CLIPTextModel.from_pretrained(tmp_path / "text_encoder", output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        assert rel_err(text_only.text_hidden(ids), ref.eval()(input_ids=ids).last_hidden_state) <= TOL


def test_config_json_round_trip():
    for cfg in [*clip.PRESETS.values(), replace(clip.PRESETS["vit-l/14"], vision=None, projection_dim=None),
                replace(clip.PRESETS["vit-l/14"], vision=None)]:
        assert clip.CLIPConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    # the legacy openai/clip-vit-large-patch14 layout: values in text_config_dict / vision_config_dict
    legacy = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 768, "text_config": {},
              "text_config_dict": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                   "num_hidden_layers": 12, "projection_dim": 768, "eos_token_id": 2},
              "vision_config": {}, "vision_config_dict": {"hidden_size": 1024, "intermediate_size": 4096,
                                                          "num_attention_heads": 16, "num_hidden_layers": 24,
                                                          "patch_size": 14, "projection_dim": 768}}
    assert clip.CLIPConfig.from_json(legacy) == clip.PRESETS["vit-l/14"]
    hf = transformers.CLIPConfig(**legacy)
    assert (hf.text_config.hidden_size, hf.vision_config.patch_size, hf.vision_config.hidden_size) == (768, 14, 1024)
    text_only = clip.PRESETS["vit-l/14"].to_json(text_only=True)  # SD 1.5's text_encoder config
    assert clip.CLIPConfig.from_json(text_only) == replace(clip.PRESETS["vit-l/14"], vision=None, projection_dim=None)
    # transformers reads our presets as the same architecture
    hf = transformers.CLIPConfig(**clip.PRESETS["vit-l/14"].to_json())
    assert (hf.vision_config.patch_size, hf.vision_config.num_hidden_layers, hf.projection_dim) == (14, 24, 768)


def test_grad_ckpt_same_gradients(ids):
    torch.manual_seed(0)
    model = clip.CLIP(clip.PRESETS["tiny"]).train()
    x = pixels()
    grads = []
    for ckpt in (False, True):
        model.grad_ckpt = ckpt
        model.zero_grad()
        (model.encode_text(ids).square().sum() + model.encode_image(x).square().sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_bf16_autocast(ids):
    torch.manual_seed(0)
    model = clip.CLIP(clip.PRESETS["tiny"]).eval()
    with torch.no_grad():
        ref = model.encode_image(pixels())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.encode_image(pixels().contiguous(memory_format=torch.channels_last))
            emb = model.encode_text(ids)
    assert out.dtype == emb.dtype == torch.bfloat16 and rel_err(out, ref) < 0.05


def test_preprocess_matches_transformers():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
              for h, w in [(300, 500), (640, 231), (224, 224), (100, 80)]]
    images.append(Image.fromarray(rng.integers(0, 256, (260, 250, 4), dtype=np.uint8), "RGBA"))  # alpha on white
    images.append(Image.fromarray(rng.integers(0, 256, (250, 260), dtype=np.uint8), "L"))
    ref = CLIPImageProcessorPil()
    for im in images:
        expected = torch.as_tensor(np.asarray(ref(im, return_tensors="np")["pixel_values"]))
        ours = clip.preprocess(im)
        assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
        assert (ours - expected).abs().max() < 1e-5, im
    assert clip.preprocess(images, size=32).shape == (len(images), 3, 32, 32)
    sixteen = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))  # 16-bit white stays white
    white = (1 - torch.tensor(clip.MEAN)) / torch.tensor(clip.STD)
    assert torch.allclose(clip.preprocess(sixteen, size=32)[0, :, 0, 0], white)


def test_parity_vit_l14_full_size():
    """One real-size check (~30 s on 2 cores): random ViT-L/14, config inferred from the shapes, batch 1."""
    torch.manual_seed(0)
    ref = transformers.CLIPModel(transformers.CLIPConfig(**clip.PRESETS["vit-l/14"].to_json())).eval()
    ours = clip.CLIP.from_state_dict(ref.state_dict()).eval()
    assert ours.cfg == clip.PRESETS["vit-l/14"]
    ids, x = clip.Tokenizer()(["a photo of a woman in a red floral dress"]), torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        errs = dict(text=rel_err(ours.encode_text(ids), features(ref.get_text_features(input_ids=ids))),
                    image=rel_err(ours.encode_image(x), features(ref.get_image_features(pixel_values=x))),
                    hidden=rel_err(ours.text_hidden(ids), ref.text_model(input_ids=ids).last_hidden_state))
    assert max(errs.values()) <= TOL, errs


def test_copied_with_weights_py_only():
    """clip.py builds and runs with torch and einops alone; only its loaders use weights.py."""
    assert repo_imports("clip") == {"weights"}
