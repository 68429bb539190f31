#!/usr/bin/env python3
"""Writes the seed corpus of registry_fuzz (tests/fuzz/corpus/registry/) in its input format.

Byte 0 configures the run: bit 0 = 64 KiB pages (else 4 KiB); bits 1-3 = v, the memlock limit of
context 1 is 4 + 4v pages; bit 4 = context 2 has CAP_IPC_LOCK with a 2-page limit (else unlimited);
bit 5 = the node may pin 40 pages (else 128). A region may have at most 16 pages (max_region_bytes).
Then 5-byte records [opcode, a, b, c, d], decoded as in registry_fuzz.cc. Pages are numbered in the
64-page address space (hole: page 13, read-only: 37, huge pages of 16 * PS: 48-63). Containers
start as 1: 4 KiB IOMMU pages, window [0, 32 pages); 2: 64 KiB, window [8, 24) pages; 3: 16 * PS,
window [0, 2^40).

Wide operands (64-bit values, see Harness::Wide) follow their record: wide(mode, b, ...) with mode
1 = 2^b, 2 = 2^64 - align * (1 + b % 16), 3 = align * b, 7 = 2^63 - align * (b % 4), where align is
the page size (register) or the container's IOMMU page size (map, unmap, windows).

Usage: tests/fuzz/make_seeds.py [OUTPUT_DIR]   (default: corpus/registry next to this file)
"""
import os
import sys

# Opcodes: the first index of each operation in registry_fuzz.cc's kOpTable.
REGISTER, UNREGISTER, MAP, UNMAP = 0, 4, 7, 11
CREATE_CONTAINER, RELEASE, TEARDOWN, CREATE_CONTEXT = 13, 14, 15, 16
TRANSLATE, LOOKUP, FIND = 17, 18, 19
UNKNOWN = 15  # the container/context byte that names an unknown id


def config(ps64k=False, limit_v=7, ctx2_cap=False, node_tight=False):
    return bytes([(1 if ps64k else 0) | (limit_v << 1) | (16 if ctx2_cap else 0) |
                  (32 if node_tight else 0)])


def rec(*b):
    b = list(b) + [0] * (5 - len(b))
    return bytes(b)


def reg(c, ctx, page, entries, weird=None):
    # weird: 0 misaligned ua, 1 misaligned size, 2 near 2^64, 3 zero size
    p = page if weird is None else 192 + page
    l = (entries - 1) | ((weird or 0) << 4)
    return rec(REGISTER, c - 1 if c != UNKNOWN else c, ctx - 1 if ctx != UNKNOWN else ctx, p, l)


def unreg(c, page, entries, weird=None):
    p = page if weird is None else 192 + page
    l = (entries - 1) | ((weird or 0) << 4)
    return rec(UNREGISTER, c - 1, p, l)


def map_(c, iova_page, page, n, sub=0, weird=None):
    # weird: 0 misaligned ua, 1 ua near 2^64, 2 zero size, 3 iova at the top of 2^40
    p = page if weird is None else 192 + page
    l = (n - 1) | ((weird if weird is not None else sub) << 4)
    return rec(MAP, c - 1, iova_page, p, l)


def unmap(c, iova_page, n):
    return rec(UNMAP, c - 1, iova_page, n)


def create_container(c, iommu_choice, window_choice):
    return rec(CREATE_CONTAINER, c - 1 if c != UNKNOWN else c, iommu_choice + 5 * window_choice)


def release(c):
    return rec(RELEASE, c - 1 if c != UNKNOWN else c)


def teardown(ctx):
    return rec(TEARDOWN, ctx - 1 if ctx != UNKNOWN else ctx)


def create_context(ctx):
    return rec(CREATE_CONTEXT, ctx - 1 if ctx != UNKNOWN else ctx)


def translate(ctx, page, offset=0, session=False):
    return rec(TRANSLATE, ctx - 1, page, offset, 1 if session else 0)


def lookup(ctx, page, quarter_pages):
    return rec(LOOKUP, ctx - 1, page, quarter_pages - 1)


def find(ctx, page, entries):
    return rec(FIND, ctx - 1, page, entries)


def wide(mode, b, *extra):
    return bytes([mode, b, *extra])


def reg_wide(c, ctx, ua, size):
    return rec(REGISTER, c - 1, ctx - 1, 192, 0x40) + ua + size


def unreg_wide(c, ua, size):
    return rec(UNREGISTER, c - 1, 192, 0x40) + ua + size


def map_wide(c, iova, ua, size):
    return rec(MAP, c - 1, 0, 192, 0x40) + iova + ua + size


def unmap_wide(c, iova, size):
    return rec(UNMAP, c - 1, 0, 0, 1) + iova + size


def create_container_wide(c, log2_iommu_page, start, size):
    return rec(CREATE_CONTAINER, c - 1, log2_iommu_page - 12, 1) + start + size


SEEDS = {
    "01_register_map_unmap_unregister": config() + b"".join([
        reg(1, 1, 0, 4), translate(1, 1, 77), map_(1, 0, 0, 4), unreg(1, 0, 4),
        unmap(1, 0, 4), unreg(1, 0, 4), translate(1, 1, 77)]),
    "02_shared_region_two_containers": config() + b"".join([
        reg(1, 1, 2, 8), reg(2, 1, 2, 8), find(1, 2, 8), unreg(1, 2, 8), unreg(2, 2, 8),
        unreg(2, 2, 8)]),
    "03_duplicate_register_ebusy": config() + b"".join([
        reg(1, 1, 4, 2), reg(1, 1, 4, 2), unreg(1, 4, 2)]),
    "04_overlap_and_adjacent": config() + b"".join([
        reg(1, 1, 8, 4), reg(2, 1, 10, 4), reg(2, 1, 8, 8), reg(2, 1, 12, 1), reg(2, 1, 7, 1),
        lookup(1, 8, 16), lookup(1, 8, 17), translate(1, 12, 3)]),
    "05_memlock_enomem": config(limit_v=0) + b"".join([
        reg(1, 1, 0, 4), reg(1, 1, 4, 1), reg(2, 1, 0, 4), unreg(1, 0, 4), reg(1, 1, 4, 1)]),
    "06_cap_ipc_lock_counts": config(ctx2_cap=True) + b"".join([
        reg(1, 2, 0, 8), reg(2, 2, 20, 16), translate(2, 3, 0)]),
    "07_hole_and_readonly_efault": config() + b"".join([
        reg(1, 1, 10, 6), reg(1, 1, 36, 4), reg(1, 1, 14, 4), reg(1, 1, 33, 4)]),
    "08_huge_pages_map": config() + b"".join([
        reg(3, 1, 48, 16), map_(3, 0, 48, 1), map_(3, 1, 32, 1), reg(3, 1, 30, 2),
        map_(3, 2, 30, 1), unreg(3, 48, 16), unmap(3, 0, 4), unreg(3, 48, 16)]),
    "09_pending_release": config(ps64k=True) + b"".join([
        reg(1, 1, 0, 4), reg(2, 1, 20, 2), map_(2, 8, 0, 1), release(1), find(1, 0, 4),
        unmap(2, 8, 1), find(1, 0, 4)]),
    "10_teardown_with_mappings": config(ps64k=True) + b"".join([
        reg(1, 1, 0, 4), reg(2, 1, 20, 2), map_(1, 0, 0, 2), map_(2, 8, 20, 1), teardown(1),
        reg(1, 1, 0, 4), create_context(1), create_container(1, 0, 0), reg(1, 1, 0, 4)]),
    "11_eperm": config() + b"".join([
        map_(3, 0, 48, 1), reg(1, 1, 0, 1), reg(1, 2, 4, 1), unmap(3, 0, 1)]),
    "12_misaligned_wrap_zero": config(ps64k=True) + b"".join([
        reg(1, 1, 0, 2, weird=0), reg(1, 1, 0, 2, weird=1), reg(1, 1, 0, 2, weird=2),
        reg(1, 1, 1, 1, weird=2), reg(1, 1, 0, 2, weird=3), unreg(1, 0, 2, weird=3),
        map_(1, 0, 0, 1, weird=0)]),
    "13_4k_iommu_on_64k_pages": config(ps64k=True) + b"".join([
        reg(1, 1, 0, 2), map_(1, 0, 0, 8, sub=3), map_(1, 9, 1, 8, sub=15), translate(1, 1, 200),
        unreg(1, 0, 2), unmap(1, 0, 32), unreg(1, 0, 2)]),
    "14_remap_moves_count": config() + b"".join([
        reg(1, 1, 0, 2), reg(1, 1, 2, 2), map_(1, 0, 0, 1), map_(1, 0, 2, 1), unreg(1, 0, 2),
        map_(1, 0, 60, 1), unreg(1, 2, 2)]),
    "15_map_across_regions_and_rollback": config() + b"".join([
        reg(1, 1, 0, 2), reg(1, 1, 2, 2), map_(1, 0, 0, 4), map_(1, 4, 2, 4), unmap(1, 0, 8),
        unreg(1, 0, 2), unreg(1, 2, 2)]),
    "16_containers_and_windows": config(ps64k=True) + b"".join([
        create_container(UNKNOWN, 4, 0), create_container(UNKNOWN, 0, 3),
        create_container(UNKNOWN, 1, 1), create_container(1, 0, 0), reg(2, 1, 0, 4),
        map_(2, 0, 0, 1), map_(2, 8, 0, 1), map_(2, 23, 0, 2), map_(2, 23, 0, 1),
        map_(2, 0, 0, 1, weird=3), release(2), release(2), create_container(2, 1, 2)]),
    "17_lookup_find_translate": config(ps64k=True) + b"".join([
        reg(1, 1, 5, 3), reg(2, 2, 5, 3), lookup(1, 5, 12), lookup(1, 5, 13), lookup(1, 4, 4),
        find(1, 5, 3), find(1, 5, 2), translate(1, 7, 255), translate(2, 7, 255),
        translate(1, 8, 0), translate(1, 5, 9, session=True), translate(2, 3, 4, session=True)]),
    "18_teardown_and_recreate": config(ctx2_cap=True) + b"".join([
        reg(1, 2, 0, 4), teardown(2), teardown(2), translate(2, 0, 0), create_context(2),
        create_context(2), create_container(1, 1, 0), reg(1, 2, 0, 4), teardown(UNKNOWN)]),
    "19_release_and_reuse_id": config() + b"".join([
        reg(1, 1, 0, 4), map_(1, 0, 0, 2), release(1), map_(1, 0, 0, 1), create_container(1, 0, 2),
        reg(1, 2, 0, 4), map_(1, 0, 0, 4), release(1), release(UNKNOWN)]),
    "20_mixed": config(ps64k=True, limit_v=7) + b"".join([
        reg(1, 1, 0, 4), reg(2, 1, 4, 4), reg(3, 1, 48, 16), map_(1, 0, 0, 8), map_(2, 8, 4, 2),
        map_(3, 0, 48, 1), reg(2, 1, 0, 4), unreg(1, 0, 4), release(2), unmap(1, 0, 16),
        release(3), teardown(1), create_context(1), reg(1, 1, 0, 16)]),
    # Issue 11: 64-bit sizes, addresses and windows; the limits refuse the huge registrations.
    "22_huge_ranges_and_limits": config(ps64k=True, node_tight=True) + b"".join([
        reg_wide(2, 2, wide(3, 0), wide(7, 0)),             # 2^63 bytes: over the region limit
        reg_wide(2, 2, wide(1, 40), wide(3, 17)),           # 17 pages: over it by one page
        reg_wide(2, 2, wide(1, 40), wide(3, 16)),           # 16 pages at 2^40: exactly the limit
        reg_wide(2, 2, wide(2, 15), wide(3, 16)),           # the last 16 pages below 2^64
        reg_wide(3, 2, wide(5, 0), wide(3, 9)),             # 41 pages pinned > 40: node limit
        release(1),
        create_container_wide(1, 16, wide(3, 0), wide(2, 0)),  # window [0, 2^64 - 64 KiB)
        reg_wide(1, 2, wide(1, 40), wide(3, 16)),
        map_wide(1, wide(2, 1), wide(1, 40), wide(3, 1)),   # the window's last page
        map_wide(1, wide(3, 0), wide(1, 40), wide(3, 16)),
        map_wide(1, wide(3, 0), wide(1, 40), wide(7, 0)),   # 2^63 bytes: more than registered
        unmap_wide(1, wide(3, 0), wide(2, 0)),              # the whole window
        unreg_wide(1, wide(1, 40), wide(3, 16)),
        unreg_wide(2, wide(2, 15), wide(3, 16))]),
}


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "corpus", "registry")
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"wrote {len(SEEDS)} seeds to {out}")


if __name__ == "__main__":
    main()
