#!/usr/bin/env python3
"""Which pages of a running process became resident, and what is on them
(issue 17): the soak's RSS rose while the allocator's live bytes stayed flat,
so the growth is pages of memory already allocated being written for the
first time. This finds those pages and reads them.

  resident_pages.py snapshot PID FILE
      records the resident pages of PID's private anonymous mappings;
  resident_pages.py diff PID FILE [--samples N]
      the pages resident now and not at FILE's snapshot, by mapping, and
      what they hold: how much of each page is still zero, how many HTTP/2
      PING frames and pointer-sized words that point into the heap it
      holds, the printable strings that recur on them, and N pages dumped.

  resident_pages.py h2-write-buffers PID
      finds each connection's HTTP/2 write buffer (h2 gives every
      connection a 16 KiB one, which jemalloc places over five pages) by
      the `BytesMut` that owns it, and counts how many of its pages are
      resident: a buffer only ever written at its start needs one.

Reads /proc/PID/maps, /proc/PID/pagemap (bit 63: present; as root, the page
frame too) and /proc/PID/mem, so it runs as root or as the process's owner.
A page is resident when it is present and is not the kernel's shared zero
page (/proc/kpageflags): reading a never-written page through /proc/PID/mem
maps the zero page there, which the RSS does not count. Run it beside
soak.py, with the server's PID from `pgrep -x flotte-server`.
"""

import argparse
import collections
import json
import re
import struct
import sys

PAGE = 4096
PRESENT = 1 << 63
FRAME_NUMBER = (1 << 55) - 1
# /proc/kpageflags: the page is the kernel's shared zero page.
ZERO_PAGE_FLAG = 1 << 24
# h2's write buffer as tokio's `bytes` crate lays out the `BytesMut` that
# owns it: {ptr, len, cap, data}, with cap 16 KiB and data 0x15 (a plain
# vector, 16 KiB its original capacity, nothing consumed from its front).
# Its `flush` clears it without consuming, so both words stay put.
WRITE_BUFFER_CAPACITY = 16 * 1024
WRITE_BUFFER_OWNER_TAIL = struct.pack("<QQ", WRITE_BUFFER_CAPACITY, 0x15)
# HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream. A PING is
# always 8 bytes long, type 6, on stream 0; its acknowledgement has flag 1.
PING = bytes([0, 0, 8, 6, 0, 0, 0, 0, 0])
PING_ACK = bytes([0, 0, 8, 6, 1, 0, 0, 0, 0])
PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{8,}")


def anonymous_mappings(pid):
    """Private mappings backed by no file: the heap and the allocator's."""
    mappings = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(part, 16) for part in fields[0].split("-"))
            permissions = fields[1]
            name = fields[5] if len(fields) > 5 else ""
            if permissions.startswith("rw") and permissions[3] == "p" and name in ("", "[heap]"):
                mappings.append((start, end, name))
    return mappings


class ZeroPage:
    """Tells the kernel's shared zero page from a page of the process's own
    (its frame number is the same everywhere; found once, then remembered)."""

    def __init__(self):
        self.frame = None
        try:
            self.flags = open("/proc/kpageflags", "rb")
        except OSError:
            self.flags = None  # not root: frame numbers read as 0 anyway

    def is_zero_page(self, frame):
        if self.frame is not None or self.flags is None or frame == 0:
            return frame == self.frame
        self.flags.seek(frame * 8)
        if struct.unpack("<Q", self.flags.read(8))[0] & ZERO_PAGE_FLAG:
            self.frame = frame
            return True
        return False


def resident_pages(pid, mappings):
    zero_page = ZeroPage()
    pages = set()
    with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for start, end, _ in mappings:
            pagemap.seek(start // PAGE * 8)
            entries = pagemap.read((end - start) // PAGE * 8)
            for index, (entry,) in enumerate(struct.iter_unpack("<Q", entries)):
                if entry & PRESENT and not zero_page.is_zero_page(entry & FRAME_NUMBER):
                    pages.add(start // PAGE + index)
    return pages


def write_buffers(arguments):
    """h2's per-connection write buffers and how many of their pages are
    resident. A fresh buffer has one (h2 writes each flush from its start);
    a buffer placed on pages freed moments before by something else keeps
    all of theirs, though it never writes past the first."""
    mappings = anonymous_mappings(arguments.pid)
    pages = resident_pages(arguments.pid, mappings)
    buffers = set()
    with open(f"/proc/{arguments.pid}/mem", "rb") as memory:
        for page in sorted(pages):
            memory.seek(page * PAGE)
            try:
                content = memory.read(PAGE)
            except OSError:
                continue
            found = content.find(WRITE_BUFFER_OWNER_TAIL)
            while found >= 0:
                # The owner is 8-byte aligned and lies whole on this page.
                if found % 8 == 0 and found >= 16:
                    pointer, length = struct.unpack_from("<QQ", content, found - 16)
                    if length <= WRITE_BUFFER_CAPACITY and pointer >= PAGE:
                        buffers.add(pointer)
                found = content.find(WRITE_BUFFER_OWNER_TAIL, found + 1)
    histogram = collections.Counter()
    for pointer in buffers:
        first, last = pointer // PAGE, (pointer + WRITE_BUFFER_CAPACITY - 1) // PAGE
        histogram[sum(1 for page in range(first, last + 1) if page in pages)] += 1
    spare = sum((pages_resident - 1) * count for pages_resident, count in histogram.items() if pages_resident)
    print(f"{len(buffers)} HTTP/2 write buffers; buffers by their resident pages: "
          + ", ".join(f"{count}: {histogram[count]}" for count in sorted(histogram)))
    print(f"resident pages past each buffer's first: {spare} ({spare * PAGE / 2**20:.2f} MiB)")


def snapshot(arguments):
    mappings = anonymous_mappings(arguments.pid)
    pages = resident_pages(arguments.pid, mappings)
    with open(arguments.file, "w") as out:
        json.dump({"mappings": mappings, "pages": sorted(pages)}, out)
    print(f"{len(pages)} resident pages ({len(pages) * PAGE / 2**20:.1f} MiB) in {len(mappings)} anonymous mappings")


def diff(arguments):
    with open(arguments.file) as earlier_file:
        earlier = json.load(earlier_file)
    earlier_pages = set(earlier["pages"])
    mappings = anonymous_mappings(arguments.pid)
    pages = resident_pages(arguments.pid, mappings)
    new = sorted(pages - earlier_pages)
    gone = earlier_pages - pages
    print(f"resident then {len(earlier_pages)} pages, now {len(pages)}: "
          f"{len(new)} new ({len(new) * PAGE / 2**20:.2f} MiB), {len(gone)} gone")

    def mapping_of(page):
        address = page * PAGE
        for start, end, name in mappings:
            if start <= address < end:
                return (start, end, name)
        return None

    heap_ranges = [(start, end) for start, end, _ in mappings]

    def points_into_heap(word):
        return any(start <= word < end for start, end in heap_ranges)

    by_mapping = collections.Counter()
    zero_histogram = collections.Counter()
    strings = collections.Counter()
    pages_with_pings = 0
    pings = 0
    acknowledgements = 0
    pointer_pages = 0
    dumped = 0
    with open(f"/proc/{arguments.pid}/mem", "rb") as memory:
        for page in new:
            start, end, name = mapping_of(page)
            by_mapping[f"{start:#x}-{end:#x} {(end - start) // 2**20} MiB {name}"] += 1
            memory.seek(page * PAGE)
            try:
                content = memory.read(PAGE)
            except OSError:
                continue
            zero_histogram[content.count(0) * 10 // (PAGE + 1)] += 1
            page_pings = content.count(PING) + content.count(PING_ACK)
            pings += page_pings
            # Who wrote them: the server answers each agent's ping (every
            # 5 s) and pings every 10 s itself, so its outgoing buffers hold
            # twice as many acknowledgements as pings, its incoming ones the
            # reverse.
            acknowledgements += content.count(PING_ACK)
            pages_with_pings += page_pings > 0
            words = struct.unpack(f"<{PAGE // 8}Q", content)
            if sum(1 for word in words if word and points_into_heap(word)) >= 32:
                pointer_pages += 1
            for match in set(PRINTABLE_RUN.findall(content)):
                strings[re.sub(rb"[0-9a-f]{6,}|[0-9]+", b"#", match)[:60]] += 1
            if dumped < arguments.samples:
                dumped += 1
                print(f"\n--- page {page * PAGE:#x}: {content.count(0)} zero bytes, {page_pings} HTTP/2 PINGs")
                for offset in range(0, PAGE, 32):
                    row = content[offset:offset + 32]
                    if row.count(0) < 32:
                        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
                        print(f"{offset:04x} {row.hex()} {text}")
    print("\nnew pages by mapping:")
    for mapping, count in by_mapping.most_common():
        print(f"  {count:6} {mapping}")
    print("\nnew pages by the share of their bytes still zero (tenths):")
    for tenths in sorted(zero_histogram):
        print(f"  {tenths * 10:3}–{tenths * 10 + 10:3} % zero: {zero_histogram[tenths]}")
    print(f"\npages holding HTTP/2 PING frames: {pages_with_pings} ({pings} frames, "
          f"{acknowledgements} of them acknowledgements)")
    print(f"pages with 32 or more words pointing into the heap: {pointer_pages}")
    print("\nstrings on the most new pages (digits and hex runs as #):")
    for text, count in strings.most_common(40):
        print(f"  {count:6} {text.decode('ascii', 'replace')}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    take = commands.add_parser("snapshot")
    take.add_argument("pid", type=int)
    take.add_argument("file")
    compare = commands.add_parser("diff")
    compare.add_argument("pid", type=int)
    compare.add_argument("file")
    compare.add_argument("--samples", type=int, default=4)
    buffers = commands.add_parser("h2-write-buffers")
    buffers.add_argument("pid", type=int)
    arguments = parser.parse_args()
    {"snapshot": snapshot, "diff": diff, "h2-write-buffers": write_buffers}[arguments.command](arguments)


if __name__ == "__main__":
    sys.exit(main())
