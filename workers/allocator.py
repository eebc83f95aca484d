"""Keep a long-lived worker's resident memory flat across jobs: glibc's malloc trim threshold.

glibc raises its mmap threshold each time a large block allocated by mmap is
freed, so after the first few tensors of a size, later ones of that size come
from the heap instead -- and a heap does not shrink while anything above them
is live. A worker that decodes clip after clip (one latent frame at a time, each
chunk's activations freed before the next) then sees its peak resident set creep
up with the clip length: +18% from 17 to 81 frames at the Wan2.1 VAE, +21% with
the tiny VAE at 256x256. Setting the trim threshold (``M_TRIM_THRESHOLD``) turns
that adjustment off and returns freed memory at the top of the heap at once:
the same 17-to-81-frame decode then grows +1.2%, with a 28-40% lower peak, at the
same speed (bench/README.md, "Decode"). Equivalent to ``MALLOC_TRIM_THRESHOLD_=0``
in the environment, which takes precedence when set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger("reelfarm.worker")

# From glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
ENV_OVERRIDE = "MALLOC_TRIM_THRESHOLD_"


def return_freed_memory_promptly(trim_threshold: int = 0) -> bool:
    """Set glibc's trim threshold (and so a fixed mmap threshold); False where the C library is not glibc."""
    if ENV_OVERRIDE in os.environ:
        return False  # the operator chose; glibc read it at start
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        log.info("not glibc: leaving the allocator's trim threshold alone")
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_TRIM_THRESHOLD, trim_threshold))
