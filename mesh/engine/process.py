"""What an engine changes beyond itself, for its whole process, in one place.

A library constructor should not reach into process-wide state behind its caller's back; the engine
does in two documented places, because it owns its process (a `mesh serve` gateway, an expert worker,
a benchmark), and everything else in mesh/ leaves the process alone:

- `Engine.__init__` seeds torch's global generator with EngineConfig.seed, so that whatever draws
  from it is the same on every run. Sampling and `--load-format dummy` weights use generators of their
  own and do not depend on it.
- A CPU engine calls `keep_freed_memory()` (below): glibc allocator thresholds, for the process.

Process-wide state that is not a side effect of a constructor, but a cache owned by its module:

- mesh/model/cpu/native.py: the compiled CPU kernels, loaded once per process (`library()`), and their
  settings (MESH_NATIVE_THREADS read once; MESH_NATIVE_AMX and MESH_NATIVE_BF16_WIDE applied to the
  loaded library; `refresh_settings()` re-reads them).
- mesh/model/cuda/fused_moe.py: the tile configurations read from moe_configs/, cached per shape.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory() -> None:
    """Let glibc serve tensors up to 32 MiB from its heap and keep freed memory, process-wide.

    By default a freed multi-megabyte tensor goes back to the kernel, and the next step's tensor of
    the same size faults in fresh zeroed pages: at prefill sizes that costs more than the op itself
    (an 8 MiB gather runs ~4x slower). 32 MiB is glibc's ceiling for the mmap threshold.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): leave its allocator alone
        return
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
