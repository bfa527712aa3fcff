"""Triton GPU kernels, each beside a plain-torch reference, chosen by one dispatcher.

Every kernel registers two implementations under one name: ``torch`` (the reference, runs anywhere, the
definition of correct) and ``triton`` (the fast path on CUDA). :func:`get_kernel` picks one:

- ``LLMCTL_KERNELS=torch`` or ``=triton`` forces a backend (``triton`` on a CPU runs under
  ``TRITON_INTERPRET=1``, which is how CI tests kernels);
- otherwise (``auto``) Triton is used when the inputs live on a CUDA device and Triton imports,
  and the torch reference everywhere else.

Kernels themselves land with the issues that need them (one file per kernel in this package).
"""

from llmctl.kernels.dispatch import KernelSpec, available_kernels, get_kernel, kernel_backend, register_kernel

__all__ = ["KernelSpec", "available_kernels", "get_kernel", "kernel_backend", "register_kernel"]
