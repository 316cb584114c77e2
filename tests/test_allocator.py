"""The allocator policy (seqmix/allocator.py): under the seqmix command, a large block torch frees stays in the
process for the next call instead of going back to the kernel; a user's own malloc settings win.

Each case runs in a fresh interpreter, since the policy is process-wide and glibc's state depends on
what the process allocated before. Where the block came from is read from glibc's ``mallinfo2``:
``hblkhd`` counts the bytes held in separately mapped blocks, ``arena`` the heap's.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy sets glibc's malloc; this C library is not glibc")

PROBE = """
import ctypes, json, sys
import torch

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

{setup}

def mapped():
    return libc.mallinfo2().hblkhd

before = mapped()
block = torch.empty(4 * 2**20)  # 16 MiB, the size of one (1, 16384, 256) float32 activation
block.fill_(1.0)
while_held = mapped() - before
del block
heap_after_free = libc.mallinfo2().arena
again = torch.empty(4 * 2**20)
print(json.dumps({{"policy": policy, "mapped_while_held": while_held, "heap_after_free": heap_after_free,
                  "mapped_again": mapped() - before}}))
"""
SIXTEEN_MIB = 16 * 2**20


def probe(setup: str, **environment: str) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("MALLOC_") and key != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], capture_output=True, text=True,
                          env={**env, **environment}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_with_the_policy_a_large_block_comes_from_the_heap_and_stays_there_when_freed():
    kept = probe("from seqmix.allocator import keep_freed_memory\npolicy = keep_freed_memory()")
    assert kept["policy"] == "glibc malloc keeping freed memory (mmap threshold 32 MiB, no trim)"
    assert kept["mapped_while_held"] < SIXTEEN_MIB and kept["mapped_again"] < SIXTEEN_MIB
    assert kept["heap_after_free"] >= SIXTEEN_MIB


def test_without_it_glibc_maps_the_same_block_on_its_own():
    # The contrast that makes the test above mean something: glibc's first large block is mapped.
    default = probe("policy = None")
    assert default["mapped_while_held"] >= SIXTEEN_MIB


def test_the_users_own_malloc_settings_are_left_as_they_are():
    chosen = probe("from seqmix.allocator import keep_freed_memory\npolicy = keep_freed_memory()", MALLOC_ARENA_MAX="2")
    assert chosen["policy"] == "glibc malloc as set by MALLOC_ARENA_MAX"
    assert chosen["mapped_while_held"] >= SIXTEEN_MIB
    tuned = probe("from seqmix.allocator import keep_freed_memory\npolicy = keep_freed_memory()",
                  GLIBC_TUNABLES="glibc.malloc.tcache_count=0")
    assert tuned["policy"] == "glibc malloc as set by GLIBC_TUNABLES"


def test_the_seqmix_command_applies_it():
    ran = probe("from seqmix.allocator import applied_policy\nassert applied_policy() is None\n"
                "from seqmix.cli import main\nassert main(['describe', 'model=transformer', 'model.depth=1']) == 0\n"
                "policy = applied_policy()")
    assert ran["policy"].startswith("glibc malloc keeping freed memory")
    assert ran["mapped_while_held"] < SIXTEEN_MIB
