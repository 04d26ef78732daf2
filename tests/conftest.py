import torch

# The suite's tensors are tiny: one intra-op thread is faster than several, and far faster when
# other processes share the CI machine's 2 cores (measured 10x on the tiny UniDiff tests).
torch.set_num_threads(1)
