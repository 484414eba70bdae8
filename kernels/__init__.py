"""Attention and cache kernels: each a torch reference, a fast path and a dispatcher with one signature."""
