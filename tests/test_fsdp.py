"""train.py --fsdp: two gloo ranks on the CPU train as two DDP ranks do (losses, first gradients, validation,
checkpoint), write the same checkpoint layout, resume exactly, and refuse what cannot run sharded.

One pair of runs serves most tests: the tiny model at 16 px, all three losses, 2 micro-steps, L2-SP, EMA, gradient
clipping (the tiny model's gradient norm is far above 1) and a validation, under DDP and under --fsdp."""
import json
import shutil

import pytest
import torch

import config
import train
from helpers import assert_same_grads
from runs import read_log
from test_train import TINY, recorded, weights, world_folder
from unidiff import UniDiff

STEPS = 3  # checkpoints at steps 2 and 3
# RSC at its t_max of 500 on one row per rank and micro-step: some micro-steps have RSC rows on one rank only, and
# under FSDP both ranks must still run the towers (UniDiff.losses)
FLAGS = TINY[2:] + ["--steps", str(STEPS), "--save-every", "2", "--eval-every", str(STEPS), "--lambda-rsc", "0.1",
                "--grad-accum", "2", "--l2sp", "1", "--ema", "0.5"]  # on a folder of 8 train and 4 test images


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"ddp": ..., "fsdp": ...}: each run's folder and its two ranks' records."""
    tmp = tmp_path_factory.mktemp("fsdp")
    data = ["--data", str(world_folder(tmp / "set", test=4))]  # validation embeds 4 pairs, not the world's 1000
    return {name: (tmp / name, recorded(tmp, name, data + FLAGS + extra, ranks=2))
            for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]))}


def step_losses(record):
    """Each step's losses (itc, is, rsc, total): the mean over its micro-steps."""
    return record["losses"].view(STEPS, 2, 4).mean(1)


def test_losses_and_first_gradients_equal_ddp(runs):
    ddp, fsdp = runs["ddp"][1], runs["fsdp"][1]
    for rank in (0, 1):  # each rank's share of the batch: the same rows, the same draws
        diff = (step_losses(fsdp[rank]) - step_losses(ddp[rank])).abs().max().item()
        assert diff < 1e-5, (diff, step_losses(fsdp[rank]), step_losses(ddp[rank]))  # measured 2e-6 (2 CPU cores)
    grads = lambda rec: {k: v for k, v in rec.items() if k.startswith("grad.")}
    ours, ref = grads(fsdp[0]), grads(ddp[0])
    assert len(ref) > 200 and all(torch.equal(v, fsdp[1][k]) for k, v in ours.items())  # gathered alike on each rank
    ours = {k: v.reshape(ref[k].shape) for k, v in ours.items()}  # the logit scale trains as (1,) under FSDP
    assert_same_grads(ours, ref)  # reduce-scatter against all-reduce: rounding only (measured ≤ 2e-8 absolute)


def test_validation_under_fsdp_measures_what_ddp_measures(runs):
    # every rank runs validation's forwards (they gather the shards), rank 0 writes: the same retrieval, EMA weights
    found = {name: [r["retrieval"] for r in read_log(run) if "retrieval" in r] for name, (run, _) in runs.items()}
    assert len(found["ddp"]) == 2 and found["fsdp"] == found["ddp"]  # at step 0 and at the end
    assert (runs["fsdp"][0] / "samples" / f"step_{STEPS:06d}.png").is_file()


def test_checkpoint_has_the_ddp_layout_and_weights_within_adamws_bound(runs):
    ckpt = {name: run / f"step_{STEPS:06d}" for name, (run, _) in runs.items()}
    a, b = weights(ckpt["fsdp"]), weights(ckpt["ddp"])
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)  # the logit scale 0-dim again
    assert a["clip/model.safetensors/logit_scale"].shape == () and any(".exp_avg_sq" in k for k in a)
    # AdamW's step is lr · m̂ / (√v̂ + ε): a weight whose true gradient is 0 gets rounding noise of either sign,
    # which the normalisation turns into a full step ±lr. Two runs whose noise differs may part by 2·lr a step,
    # so by 2·Σ lr ≤ 2·steps·(peak lr) in all (the EMA, a mix of past weights, too). Weights with a real
    # gradient agree to rounding; the bound holds for every weight.
    bound = 2 * STEPS * max(config.TINY["lr_unet"], config.TINY["lr_clip"])
    worst = max((a[k] - b[k]).abs().max().item() for k in a if "exp_avg" not in k and k.endswith(("weight", "bias")))
    assert worst <= bound, (worst, bound)
    model = UniDiff.from_pretrained(ckpt["fsdp"])  # and it loads as any checkpoint does
    assert model.clip.logit_scale.shape == ()


def test_resume_under_fsdp_is_exact(runs, tmp_path):
    # the straight run saved at steps 2 and 3: a copy without step 3 resumes from 2 and must write step 3 bit-equal
    # (validation only in the straight run: it swaps the EMA in and out, bit for bit)
    straight = runs["fsdp"][0]
    copy = tmp_path / "fsdp"
    shutil.copytree(straight, copy, ignore=shutil.ignore_patterns(f"step_{STEPS:06d}"))
    recorded(tmp_path, "fsdp", ["--resume", str(copy), "--fsdp", "--eval-every", "0"], ranks=2)
    a, b = weights(straight / f"step_{STEPS:06d}"), weights(copy / f"step_{STEPS:06d}")
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    state = json.loads((copy / f"step_{STEPS:06d}" / "state.json").read_text())
    assert state["samples_seen"] == 4 * STEPS and state["args"]["fsdp"]


@pytest.mark.parametrize("made, flags", [("ddp", ["--fsdp"]), ("fsdp", [])])
def test_a_run_resumes_across_ddp_and_fsdp(runs, made, flags, tmp_path):
    # one checkpoint layout: a DDP run goes on sharded, a sharded run under DDP (without --fsdp given again)
    straight, record = runs[made]
    copy = tmp_path / made
    shutil.copytree(straight, copy, ignore=shutil.ignore_patterns(f"step_{STEPS:06d}", "rank*.safetensors"))
    now = recorded(tmp_path, made, ["--resume", str(copy), *flags, "--eval-every", "0"], ranks=2)
    for rank in (0, 1):  # step 3 from the same step-2 state: the losses the straight run had
        diff = (now[rank]["losses"].view(1, 2, 4).mean(1) - step_losses(record[rank])[-1:]).abs().max().item()
        assert diff < 1e-5, diff
    a, b = weights(straight / f"step_{STEPS:06d}"), weights(copy / f"step_{STEPS:06d}")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    bound = 2 * max(config.TINY["lr_unet"], config.TINY["lr_clip"])  # one AdamW step apart at most (above)
    worst = max((a[k] - b[k]).abs().max().item() for k in a if "exp_avg" not in k and k.endswith(("weight", "bias")))
    assert worst <= bound, (worst, bound)
    # AdamW's moments went on from the step-2 ones: they differ by the gradients' rounding (≤ 2e-8, test above)
    moments = max((a[k] - b[k]).abs().max().item() for k in a if "exp_avg" in k)
    assert moments < 1e-6, moments
    state = json.loads((copy / f"step_{STEPS:06d}" / "state.json").read_text())
    assert state["samples_seen"] == 4 * STEPS and state["args"]["fsdp"] == bool(flags)


def test_each_unit_reaches_the_device_only_as_it_is_sharded(monkeypatch):
    # A rank of a small card must never hold the whole model: the networks go to fully_shard still on the host
    # (it moves each unit as it cuts it), and only the VAE, which stays whole, is moved by us. "meta" plays the GPU.
    import parallel
    found = []
    monkeypatch.setattr(parallel, "fully_shard", lambda m, **kw: found.append((type(m).__name__, m_device(m))))
    monkeypatch.setattr(parallel, "register_fsdp_forward_method", lambda m, name: None)
    d = parallel.Dist(True, 0, 2, torch.device("meta"), True, False, fsdp=True)
    model = UniDiff.tiny()
    train.prepare_model(model, ["unet", "text", "vision"], None, False, d)
    assert {name for name, _ in found} == {"Block", "ResnetBlock", "Transformer", "UniDiff"}
    assert {device for _, device in found} == {"cpu"} and m_device(model.vae) == "meta"


def m_device(module):
    return next(module.parameters()).device.type


@pytest.mark.parametrize("flags, says", [
    ([], "--fsdp shards over the ranks of torchrun"),
    (["--lora", "4"], "--fsdp with --lora"),
    (["--compile"], "--fsdp with --compile"),
    (["--lambda-rsc", "0.1", "--rsc-form", "anchored"], "--fsdp with --rsc-form anchored"),
])
def test_what_cannot_run_sharded_is_refused_in_one_line(flags, says, monkeypatch, capsys):
    if flags:  # all but the first under torchrun's two ranks
        monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--fsdp"] + flags)
    assert e.value.code == 2 and says in capsys.readouterr().err.strip().splitlines()[-1]
    monkeypatch.setenv("WORLD_SIZE", "2")  # what runs sharded is not refused: anchored RSC off, another form on
    train.parse_args(TINY + ["--fsdp", "--rsc-form", "anchored"])
    train.parse_args(TINY + ["--fsdp", "--lambda-rsc", "0.1", "--rsc-form", "relational"])
