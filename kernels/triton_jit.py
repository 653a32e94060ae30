"""Lazy Triton import and a `jit` that follows the mode Triton itself was imported in.

Triton picks interpreter vs compiler once, when `triton` is first imported: with TRITON_INTERPRET=1
its own library functions (tl.max, tl.argmax, tl.randint4x...) become interpreter-only, and a kernel
decorated in the other mode fails at its first reduction. So our kernels follow the library, never
the environment at decoration time. Only the Triton kernel modules import this, and only lazily.
"""

from __future__ import annotations

import functools
import os
import sys


def import_triton(interpret: bool = False):
    """Import triton; with interpret=True and triton not imported yet, import it in interpreter mode
    (TRITON_INTERPRET is restored afterwards: the mode is fixed from then on anyway)."""
    if interpret and "triton" not in sys.modules:
        old = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            import triton.language  # noqa: F401
            import triton.experimental.gluon  # noqa: F401  (imported lazily at first launch, asserts the mode)
        finally:
            if old is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = old
    import triton

    return triton


@functools.cache  # the mode is fixed once triton.language is imported; launches ask every time
def interpreter_active() -> bool:
    """True when triton.language was imported in interpreter mode (kernels then run on CPU tensors)."""
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.max, InterpretedFunction)


def jit(fn=None, *, do_not_specialize=()):
    """@triton.jit in the library's mode (see the module docstring). do_not_specialize: integer
    arguments that change from step to step (batch sizes, table widths); Triton would otherwise
    compile a variant for each of their divisibility classes, stalling the first steps of a run."""
    if fn is None:
        return lambda f: jit(f, do_not_specialize=do_not_specialize)
    if interpreter_active():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn, do_not_specialize=list(do_not_specialize))


def check_device(tensor) -> None:
    if tensor.device.type != "cuda" and not interpreter_active():
        raise RuntimeError(
            "Triton kernels on non-CUDA tensors need the interpreter: set TRITON_INTERPRET=1 before triton is "
            "first imported (or use SPEEDX_KERNELS=torch)"
        )
