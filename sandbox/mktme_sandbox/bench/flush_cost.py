"""The cost of a flushed cache line, measured on this machine (CLFLUSHOPT or CLFLUSH).

The v5 series flushes a page with ``clflush_cache_range()``: a fence, one
CLFLUSHOPT (CLFLUSH on CPUs without it) per 64-byte line, a fence. A small C
program does the same on 64-page batches, each batch first written all over
(so its lines are dirty in the cache, as a page being freed is) and flushed,
then flushed again (its lines no longer cached, as a page being allocated
after a v5 free is), best of 7 rounds. The compiler is ``cc`` (``$CC``);
without one, ``measure_flush`` returns None and the suite says so.

Assumptions, written out: one v5 cycle of a page is one dirty flush (free)
and one clean flush (allocation), so the cost of an average flushed line is
the mean of the two; the flush's cost is the instruction's, not the later
misses of the code that needed those lines (a lower bound).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FlushCost", "measure_flush"]

SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#define BATCH 64
#define BATCHES 64
static double now(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1e9 + t.tv_nsec;
}
static void flush(char *p, long len, int opt) {
    __asm__ volatile("mfence" ::: "memory");
    for (long i = 0; i < len; i += 64) {
        if (opt) __asm__ volatile("clflushopt %0" : "+m"(p[i]));
        else __asm__ volatile("clflush %0" : "+m"(p[i]));
    }
    __asm__ volatile("mfence" ::: "memory");
}
int main(int argc, char **argv) {
    int opt = argc > 1 && argv[1][0] == '1';
    long len = BATCH * 4096L;
    char *buf = aligned_alloc(4096, BATCHES * len);
    double dirty = 1e30, clean = 1e30;
    for (int r = 0; r < 7; r++) {
        double d = 0, c = 0;
        for (int b = 0; b < BATCHES; b++) {
            char *p = buf + b * len;
            memset(p, r + b, len);
            double t0 = now(); flush(p, len, opt);
            double t1 = now(); flush(p, len, opt);
            double t2 = now();
            d += t1 - t0; c += t2 - t1;
        }
        if (d < dirty) dirty = d;
        if (c < clean) clean = c;
    }
    double lines = (double)BATCHES * len / 64;
    printf("%.3f %.3f\n", dirty / lines, clean / lines);
    return 0;
}
"""


@dataclass(frozen=True)
class FlushCost:
    """Nanoseconds per flushed line: dirty in the cache, and not cached."""

    instruction: str
    dirty_ns: float
    clean_ns: float

    @property
    def line_ns(self) -> float:
        """One dirty and one clean flush per v5 page cycle: their mean."""
        return (self.dirty_ns + self.clean_ns) / 2


def _has_clflushopt() -> bool:
    try:
        return " clflushopt" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def measure_flush() -> FlushCost | None:
    """Compile and run the microbenchmark; None without a C compiler or off x86."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None or os.uname().machine not in ("x86_64", "i686"):
        return None
    opt = _has_clflushopt()
    with tempfile.TemporaryDirectory(prefix="clflush-") as tmp:
        src, exe = Path(tmp) / "clflush.c", Path(tmp) / "clflush"
        src.write_text(SOURCE)
        built = subprocess.run(
            [cc, "-O2", "-o", str(exe), str(src)], check=False, capture_output=True
        )
        if built.returncode:
            return None
        out = subprocess.run(
            [str(exe), "1" if opt else "0"], check=False, capture_output=True, text=True
        )
    dirty, clean = (float(x) for x in out.stdout.split())
    return FlushCost("clflushopt" if opt else "clflush", dirty, clean)
