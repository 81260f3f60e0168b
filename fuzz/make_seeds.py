#!/usr/bin/env python3
"""Seed corpora for the fuzz targets from the committed fixtures of real clusters.

    python3 fuzz/make_seeds.py        (needs the zstd command; writes fuzz/corpus/<target>/)

wal_decoder: the first 16 KB and 64 KB of each major's fixture segment in raw mode (page headers
stamped valid), and runs of its records re-encoded for forged mode (rmid, info, u16 length,
body), so the fuzzer starts from real record bodies. control_file and history_file: the
fixture files, in the input layout each target expects.
"""
import json
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "common", "tests", "data")
MAJORS = [13, 14, 15, 16, 17, 18]
PAGE = 8192


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def segment(major):
    d = os.path.join(DATA, "wal", f"pg{major}")
    fx = json.load(open(os.path.join(d, "fixture.json")))
    name = fx["segments"][0]
    raw = subprocess.run(["zstd", "-dc", os.path.join(d, name + ".zst")],
                         check=True, capture_output=True).stdout
    segno = int(name[8:16], 16) * (0x100000000 // fx["seg_size"]) + int(name[16:24], 16)
    return fx["seg_size"], segno, raw


def records(seg):
    """The records of a segment that starts without a continued record: page headers removed."""
    stream = bytearray()
    for p in range(0, len(seg), PAGE):
        info = struct.unpack_from("<H", seg, p + 2)[0]
        stream += seg[p + (40 if info & 2 else 24):p + PAGE]
    pos, recs = 0, []
    while pos + 24 <= len(stream):
        tot = struct.unpack_from("<I", stream, pos)[0]
        if tot < 24 or pos + tot > len(stream):
            break
        recs.append(bytes(stream[pos:pos + tot]))
        pos += (tot + 7) & ~7
    return recs


def main():
    for i, major in enumerate(MAJORS):
        seg_size, segno, seg = segment(major)
        assert 1 <= segno < 128, segno
        size_bit = 0x40 if seg_size == 1 << 20 else 0
        for kb in (16, 64):
            out("wal_decoder", f"raw-pg{major}-{kb}k", bytes([i | 0x08 | size_bit, segno << 1, 1, 0]) + seg[:kb * 1024])
        recs = records(seg)
        for start in (0, 50, 400):
            spec = bytearray([0x80 | i | size_bit, 0, 7, 0])
            for r in recs[start:start + 40]:
                body = r[24:]
                if len(body) <= 0xFFFF:
                    spec += bytes([r[17], r[16]]) + struct.pack("<H", len(body)) + body
            out("wal_decoder", f"forged-pg{major}-{start}", bytes(spec))
        for state in ("shutdown", "running"):
            f = open(os.path.join(DATA, "control", f"pg{major}", f"pg_control.{state}"), "rb").read()
            out("control_file", f"pg{major}-{state}", bytes([0]) + f)
            out("control_file", f"pg{major}-{state}-forged", bytes([1 | (i << 1)]) + f)
    hist = os.path.join(DATA, "history")
    for name in sorted(os.listdir(hist)):
        if name.endswith(".history"):
            tli = int(name[:8], 16) if name[:8].isalnum() and len(name) == 16 else 9
            body = open(os.path.join(hist, name), "rb").read()
            out("history_file", name, struct.pack("<IQI", tli, 0x3000000, 3) + body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
