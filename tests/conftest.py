"""Shared test settings."""

import torch

# The tiny models' matrices are too small to split across threads, and on a shared CPU idle OpenMP threads
# spin: one thread made the model tests several times faster here. Code under test that sets its own thread
# count (fine-tuning beside data workers) restores it afterwards.
torch.set_num_threads(1)
