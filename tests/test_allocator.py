"""The command line's CPU allocator: a freed activation's memory serves the next one."""
import platform
import subprocess
import sys

import pytest

FAULTS = """
import resource, torch, moeify
print(moeify.keep_freed_memory() if {keep} else False)
for _ in range(3):  # 64 MiB each: above glibc's largest automatic mmap threshold (32 MiB)
    x = torch.ones(1 << 24); del x
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    x = torch.ones(1 << 24); del x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(keep: bool) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", FAULTS.format(keep=keep)], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                    reason="keep_freed_memory tunes glibc's malloc; other C libraries keep their defaults")
def test_kept_memory_is_reused_without_fresh_pages():
    applied, kept = _faults(True)
    _, system = _faults(False)
    assert applied
    assert kept < 100  # 3 x 64 MiB reallocated: no page faulted in again
    assert system > 10 * (kept + 1)  # glibc's defaults map (and fault in) every one afresh
