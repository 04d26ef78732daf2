"""Small helpers shared by the tests."""
import torch


def rel_err(ours, ref):
    """Largest absolute difference, relative to the reference's largest magnitude."""
    ours, ref = ours.detach().double(), ref.detach().double()
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@torch.no_grad()
def perturb(model, seed=0):
    """Move every parameter off its default init (norms are 1/0 there) so parity means something."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        scale = p.std() if p.numel() > 1 and p.std() > 0 else 1.0
        p.add_(0.2 * scale * torch.randn(p.shape, generator=g))
    return model
