"""Rows to an fp8 (e4m3) KV cache, rounded as the GPU rounds them, also in the CPU interpreter.

A GPU converts with cvt.rn.satfinite: to nearest, ties to even, saturating at +-448. The
interpreter's own float downcast loses the carry when rounding overflows the mantissa and rounds
ties away from zero (triton-lang/triton#8322): 1.9993 becomes 1.0, not 2.0. So under the
interpreter the value is first rounded onto the e4m3 grid in fp32 arithmetic; a value on the grid
then converts exactly.
"""

from __future__ import annotations

from speedx.kernels.triton_jit import import_triton, jit

triton = import_triton()
import triton.language as tl  # noqa: E402


@jit
def to_cache_dtype(x, cache_dtype: tl.constexpr, ROUND_IN_SOFTWARE: tl.constexpr):
    """x converted to the cache's dtype (the activation dtype, or fp8 e4m3); ROUND_IN_SOFTWARE under
    the interpreter (the launchers pass interpreter_active())."""
    if ROUND_IN_SOFTWARE:
        if cache_dtype == tl.float8e4nv:
            x = _round_to_e4m3_grid(x.to(tl.float32))
    return x.to(cache_dtype)


@jit
def _round_to_e4m3_grid(x):
    """fp32 x rounded to the nearest e4m3 value (ties to even), saturated at +-448, still in fp32."""
    negative = x.to(tl.int32, bitcast=True) < 0  # the sign bit: -0.0 stays -0.0
    a = tl.minimum(tl.abs(x), 448.0)
    # The grid's step at a: 2^(exponent - 3) for normal values (exponent >= -6), 2^-9 below them.
    exponent = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    step_exponent = tl.maximum(exponent, -6) - 3
    # Adding 2^(step_exponent + 23) leaves fp32 a step of exactly that size: the sum rounds a to the
    # grid (to nearest, ties to even), and subtracting it again is exact.
    magic = ((step_exponent + 23 + 127) << 23).to(tl.float32, bitcast=True)
    rounded = (a + magic) - magic
    return tl.where(negative, -rounded, rounded)
