#!/usr/bin/env python3
"""The instructions a thread issues per pass of each streaming loop of a kernel entry, read from
its SASS (`cuobjdump -sass -fun ENTRY`): every innermost loop (a backward branch) with 4 or more 16-byte
global loads, its instructions in all (static) and on the common path, where each conditional
forward branch inside the loop is taken as jumping over a rare case (the pack that holds the
target, a new running max, an unaligned store). What a count means for bandwidth: see
scripts/sass-loops.sh.

Usage: sass_loops.py FILE.sass [NAME]"""
import re
import sys
from collections import Counter


def instructions(path):
    out = []
    for line in open(path).read().splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def opcode(text):
    return re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0]


def target(text):
    m = re.search(r"0x([0-9a-f]+)", text)
    return int(m.group(1), 16) if m else None


def main():
    ins = instructions(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else sys.argv[1]
    index = {a: i for i, (a, _) in enumerate(ins)}
    found = False
    for i, (addr, text) in enumerate(ins):
        start = target(text) if opcode(text) == "BRA" else None
        if start is None or start >= addr or start not in index:
            continue
        body = ins[index[start] : i + 1]
        loads = sum(opcode(t).startswith("LDG.E.128") for _, t in body)
        # Innermost loops only: the row loops around them hold their loads too.
        nested = any(
            opcode(t) == "BRA" and (end := target(t)) is not None and start <= end < b for b, t in body[:-1]
        )
        if loads < 4 or nested:
            continue
        skipped = set()
        for b, t in body:
            end = target(t) if opcode(t) == "BRA" and t.startswith("@") else None
            if end is not None and b < end <= addr:
                skipped.update(c for c, _ in body if b < c < end)
        common = [t for b, t in body if b not in skipped]
        kinds = Counter(opcode(t).split(".")[0] for t in common)
        found = True
        print(
            f"{name} loop {start:#x}-{addr:#x}: {len(common)} instructions on the common path "
            f"({len(body)} in all), {loads} LDG.E.128, {kinds['STG']} STG, {kinds['MUFU']} MUFU"
        )
        print("    " + ", ".join(f"{k} {v}" for k, v in kinds.most_common(16)))
    if not found:
        print(f"{name}: no loop with 4 or more 16-byte loads")


if __name__ == "__main__":
    main()
