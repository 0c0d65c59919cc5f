#!/usr/bin/env python3
"""Where a process's heap spreads (issue 17): reads a raw heaptrack trace and,
at chosen times, says which allocation sites hold the heap's pages.

heaptrack's own reports count live bytes, which stayed flat in the soak while
the resident size crept. What costs resident memory is pages, so this reads
the raw trace (`heaptrack -r`), which keeps every block's address, and at each
snapshot time prints:
  * per heap region (glibc's main heap; each other arena's 64 MiB heap): the
    pages holding live blocks, the live bytes in them, and the sparse pages
    (under a quarter used);
  * the pages that hold live blocks now and held none at the previous
    snapshot, and the sites of the blocks on them: the allocations that
    spread the heap over more pages;
  * the allocations that extended a region past its highest address so far
    (what grows the heap's top), by site.
Blocks of 128 KiB and more are left out: glibc maps them on their own.

usage: heap_pages.py RAW.zst SECONDS... (from the first timestamp of the trace)
  e.g. soak.py --server-wrapper "heaptrack -r -o /tmp/heap" --minutes 22, then
       heap_pages.py /tmp/heap.raw.zst 700 1000 1320
Needs zstdcat and addr2line (binutils); reads ~10^7 events a minute.
"""

import collections
import subprocess
import sys

PAGE = 4096
MAPPED_ON_ITS_OWN = 128 * 1024
ARENA_HEAP = 64 * 1024 * 1024
# Frames that say how, not who: the allocator, the standard library's
# containers, and closures without a path.
GENERIC_FRAME_PREFIXES = ("alloc::", "core::", "std::", "hashbrown::", "bytes::", "__rust", "__rdl",
                          "<u8 as", "<[", "<str as", "<alloc", "<core", "<std", "<T as", "<&", "heaptrack")


class Trace:
    def __init__(self):
        self.nodes = [None]  # 1-based: (instruction pointer, parent)
        self.executable = None
        self.module = None  # (load address, path) of the executable
        self.names = {}

    def frames(self, trace):
        pointers = []
        while trace and len(pointers) < 40:
            pointer, trace = self.nodes[trace]
            pointers.append(pointer)
        return pointers

    def resolve_all(self, traces):
        """Names every frame of `traces` with one run of addr2line (a run
        per trace would read the executable's debug information each time)."""
        self._resolve(sorted({pointer for trace in traces for pointer in self.frames(trace)}))

    def site(self, trace):
        """The first three frames that name code of the program or a crate."""
        pointers = self.frames(trace)
        self._resolve(pointers)
        # Generic parameters make names long and say little here.
        plain = [name[:90] if name.startswith("<") else name.split("<")[0]
                 for pointer in pointers for name in self.names[pointer]]
        names = [name for name in plain if "::" in name and not name.startswith(GENERIC_FRAME_PREFIXES)]
        return " < ".join(names[:3]) or "?"

    def _resolve(self, pointers):
        unknown = [pointer for pointer in pointers if pointer not in self.names]
        if not unknown:
            return
        if self.module is None:
            self.names.update({pointer: [] for pointer in unknown})
            return
        base, path = self.module
        # A return address points after its call: look one byte back.
        # On standard input: a whole snapshot's frames can be more than a
        # command line holds.
        offsets = "\n".join(hex(pointer - base - 1) for pointer in unknown) + "\n"
        output = subprocess.run(["addr2line", "-e", path, "-f", "-C", "-i", "-a"], input=offsets,
                                capture_output=True, text=True, check=True).stdout.splitlines()
        found = collections.defaultdict(list)
        current = None
        for line in output:
            if line.startswith("0x"):
                current = int(line, 16) + base + 1
            elif current is not None and line and not line.startswith(("/", "??")) and ".rs:" not in line:
                found[current].append(line)
        for pointer in unknown:
            self.names[pointer] = found.get(pointer, [])


def region_of(address):
    # glibc's main heap lies near the executable, below the mappings; another
    # arena's heap is a 64 MiB-aligned mapping.
    return "main heap" if address < 0x7000_0000_0000 else hex(address & ~(ARENA_HEAP - 1))


def pages_of(live):
    """Live bytes per page, and (site trace, bytes) per page."""
    used = collections.defaultdict(int)
    holders = collections.defaultdict(list)
    for address, (size, trace) in live.items():
        if size >= MAPPED_ON_ITS_OWN:
            continue
        start, end = address - 16, address + size  # with glibc's chunk header
        page = start // PAGE
        while page * PAGE < end:
            share = min(end, (page + 1) * PAGE) - max(start, page * PAGE)
            used[page] += share
            holders[page].append((trace, share))
            page += 1
    return used, holders


def by_site(trace_counts, trace):
    trace.resolve_all(trace_counts)
    merged = collections.Counter()
    for trace_index, count in trace_counts.items():
        merged[trace.site(trace_index)] += count
    return merged


def report(label, live, trace, previous_pages, extended):
    used, holders = pages_of(live)
    print(f"\n===== {label}: {len(live)} live blocks, {sum(size for size, _ in live.values()) / 2**20:.1f} MiB")
    regions = collections.defaultdict(lambda: [0, 0, 0])
    for page, bytes_used in used.items():
        region = regions[region_of(page * PAGE)]
        region[0] += 1
        region[1] += bytes_used
        region[2] += bytes_used < PAGE // 4
    for name, (pages, bytes_used, sparse) in sorted(regions.items()):
        print(f"  {name}: {pages} pages hold live blocks ({pages * PAGE / 2**20:.1f} MiB), "
              f"{bytes_used / 2**20:.1f} MiB live in them, {sparse} sparse")
    if previous_pages is not None:
        newly = set(used) - previous_pages
        emptied = previous_pages - set(used)
        print(f"  pages newly holding live blocks {len(newly)}, emptied {len(emptied)}: "
              f"net {(len(newly) - len(emptied)) * PAGE / 2**20:+.2f} MiB")
        share = collections.Counter()
        for page in newly:
            for trace_index, bytes_on_page in holders[page]:
                share[trace_index] += bytes_on_page / used[page]
        print("  -- who holds the newly occupied pages (pages, each shared by its bytes):")
        for site, pages in by_site(share, trace).most_common(20):
            print(f"   {pages:8.1f}  {site}")
    print(f"  -- allocations past a region's highest address since the last snapshot "
          f"({sum(extended.values()) / 2**20:.2f} MiB):")
    for site, size in by_site(extended, trace).most_common(12):
        print(f"   {size / 1024:9.1f} KiB  {site}")
    sys.stdout.flush()
    return set(used)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    path, times = sys.argv[1], sorted(float(argument) for argument in sys.argv[2:])
    reader = subprocess.Popen(["zstdcat", path], stdout=subprocess.PIPE, text=True, bufsize=1 << 20)
    trace = Trace()
    live = {}
    highest = {}
    extended = collections.Counter()
    first = None
    previous_pages = None
    for line in reader.stdout:
        kind = line[0]
        if kind == "+":
            _, size, trace_index, address = line.split()
            size, trace_index, address = int(size, 16), int(trace_index, 16), int(address, 16)
            live[address] = (size, trace_index)
            if size < MAPPED_ON_ITS_OWN:
                region, end = region_of(address), address + size
                if end > highest.get(region, end):
                    extended[trace_index] += end - max(highest[region], address)
                highest[region] = max(highest.get(region, end), end)
        elif kind == "-":
            live.pop(int(line.split()[1], 16), None)
        elif kind == "t":
            _, pointer, parent = line.split()
            trace.nodes.append((int(pointer, 16), int(parent, 16)))
        elif kind == "c":
            now = int(line.split()[1], 16) / 1000
            first = now if first is None else first
            while times and now - first >= times[0]:
                previous_pages = report(f"t={times.pop(0):.0f}s", live, trace, previous_pages, extended)
                extended.clear()
            if not times:
                break
        elif kind == "x":
            trace.executable = line.split(maxsplit=2)[2].strip()
        elif kind == "m":
            fields = line.split()
            if len(fields) > 3 and fields[2] == "x":  # "x": the executable itself
                trace.module = (int(fields[3], 16), trace.executable)
    reader.kill()


if __name__ == "__main__":
    main()
