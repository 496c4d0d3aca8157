"""Batch-size sweeps: steps-to-target vs batch size with tuned learning rates (Shallue et al. 2019)."""
