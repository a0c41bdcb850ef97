"""The op contract's activations as the kernels' ACTIVATION codes, and their fp32 device
functions (ffn_in's epilogue)."""

from __future__ import annotations

import triton
import triton.language as tl

from moeshard_compile.passes.op_contract import ACTIVATIONS

# The kernels' ACTIVATION code of each activation of the op contract.
ACTIVATION_CODES = {name: code for code, name in enumerate(
    ("identity", "relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh")
)}
assert ACTIVATION_CODES.keys() == ACTIVATIONS.keys(), "every activation of the contract needs a kernel code"


@triton.jit
def _tanh(x):
    """tanh from exp (tl has no tanh in every Triton version); exact at 0, saturates to +-1."""
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """The codes of ACTIVATION_CODES, in fp32."""
    y = x
    if ACTIVATION == 1:
        y = tl.maximum(x, 0.0)
    elif ACTIVATION == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 3:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACTIVATION == 4:
        y = x * tl.sigmoid(x)
    elif ACTIVATION == 5:
        y = tl.sigmoid(x)
    elif ACTIVATION == 6:
        y = _tanh(x)
    return y
