"""Small helpers shared by the tests."""
import torch


def rel_err(ours, ref):
    """Largest absolute difference, relative to the reference's largest magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
