"""Test-wide settings."""

import torch

# The suite is dominated by many tiny tensor ops, where intra-op threads only add
# synchronisation overhead (and thrash badly when another process shares the cores).
torch.set_num_threads(1)
