"""Fused and chunked computations for the hot spots of a training or decode step.

Each has a plain-XLA reference beside it and a test against that reference (Pallas kernels run in
interpret mode on the CPU); the fast path is chosen on the GPU, the reference elsewhere.
"""
import jax


def kernel_on(setting: str) -> bool:
    """Whether a kernel's setting (its JAXVLM_... environment variable) picks it: "interpret" (Pallas' interpreter on
    any backend: the tests), "on" (on a GPU), "auto" (on a process with one GPU: a Pallas call has no sharding rule,
    so under a device mesh XLA would gather its operands); anything else ("off") never."""
    if setting == "interpret":
        return True
    gpu = jax.default_backend() == "gpu"
    if setting == "on":
        return gpu
    if setting == "auto":
        return gpu and jax.device_count() == 1
    return False


def one_device_on(setting: str) -> bool:
    """Whether a setting of a rewrite that runs on any backend (its JAXVLM_... environment variable) picks it: "on"
    always, "auto" in a process with one device (where it was measured), anything else ("off") never."""
    return setting == "on" or (setting == "auto" and jax.device_count() == 1)
