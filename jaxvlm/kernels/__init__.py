"""Fused and chunked computations for the hot spots of a training or decode step.

Each has a plain-XLA reference beside it and a test against that reference (Pallas kernels run in
interpret mode on the CPU); the fast path is chosen on the GPU, the reference elsewhere.
"""
