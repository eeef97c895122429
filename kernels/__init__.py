"""Fast paths, each beside a plain-PyTorch reference: int8/int4 weight-only matmul (torch's fused CPU ops, Triton
on GPU), chosen in `kernels.dispatch`."""

from kernels.dispatch import BACKENDS, int4_linear, int8_linear

__all__ = ["BACKENDS", "int4_linear", "int8_linear"]
