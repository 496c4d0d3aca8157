"""Noisy quadratic model (Zhang et al. 2019): exact expected-risk dynamics and batch-size predictions."""
