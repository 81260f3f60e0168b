#!/usr/bin/env python3
"""Seed corpora for the fuzz targets from the committed fixtures of real clusters.

    python3 fuzz/make_seeds.py        (needs the zstd command; writes fuzz/corpus/<target>/)

wal_decoder: the first 16 KB and 64 KB of each major's fixture segment in raw mode (page headers
stamped valid), and runs of its records re-encoded for forged mode (rmid, info, u16 length,
body), so the fuzzer starts from real record bodies. control_file and history_file: the
fixture files, in the input layout each target expects. wire_messages: requests and reply
streams as protobuf (encoded here by hand), a zstd chunk, encode and chunk-diff inputs.
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
    wire_seeds()
    return 0


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def field(num, value):
    """One protobuf field: an int is a varint, bytes or str length-delimited (a message too)."""
    if isinstance(value, int):
        return varint(num << 3) + varint(value)
    if isinstance(value, str):
        value = value.encode()
    return varint(num << 3 | 2) + varint(len(value)) + value


def msg(*fields):
    return b"".join(field(n, v) for n, v in fields)


def delimited(m):
    return varint(len(m)) + m


def zstd_frame(raw):
    return subprocess.run(["zstd", "-c", "-1", "-q"], input=raw, check=True,
                          capture_output=True).stdout


def wire_seeds():
    """Seeds for wire_messages (see the modes at the top of fuzz_targets/wire_messages.rs)."""
    page = bytes((i // 64) % 7 for i in range(8192))
    rng = msg((1, "base/5/1259"), (2, 8192), (3, 65536))
    requests = [
        msg((1, "secret"), (2, msg((1, 1), (2, "0.1.0")))),
        msg((3, b"")),
        msg((1, "secret"), (6, msg((1, rng), (1, msg((1, "global/pg_control"), (3, 8192))), (2, 1)))),
        msg((7, msg((1, "pg_xact/0000"), (1, "pg_wal/000000010000000000000003"), (2, 65536)))),
        msg((9, msg((1, 0x3000028), (2, 0x5000000)))),
        msg((10, msg((1, "failback")))),
        varint(11 << 3 | 2) + varint(9) + varint(1 << 3 | 1) + struct.pack("<Q", 0x0123456789ABCDEF),
    ]
    for i, r in enumerate(requests):
        out("wire_messages", f"request-{i}", b"\x00" + delimited(r))
    control = open(os.path.join(DATA, "control", "pg16", "pg_control.shutdown"), "rb").read()
    history = open(os.path.join(DATA, "history", "00000003.history"), "rb").read()
    frame = zstd_frame(page)
    replies = [
        msg((2, msg((1, 1), (2, "0.1.0"), (3, 16), (4, 7000000000000000000), (5, 8192),
                    (6, 16 << 20), (7, "zstd"), (7, "blake3"), (7, "changes"), (8, 1 << 20),
                    (9, "port=5432 user=postgres")))),
        msg((3, msg((1, control)))),
        msg((4, msg((1, 3), (2, msg((1, 2), (2, b"1\t0/3000000\tno recovery target\n"))),
                    (2, msg((1, 3), (2, history)))))),
        msg((5, msg((1, "base/5/1259"), (2, 1), (3, 16384)))),
        msg((6, msg((1, "base/5/1259"), (2, 8192), (3, len(page)), (4, 1), (5, frame),
                    (6, bytes(32))))),
        msg((6, msg((1, "base/5/1259"), (2, 0), (3, 16), (4, 0), (5, page[:16]), (6, bytes(32)),
                    (7, 1)))),
        msg((7, msg((1, "pg_xact/0000"), (2, 3 * 65536 - 100), (3, 65536),
                    *[(4, bytes([i]) * 32) for i in range(3)]))),
        msg((9, msg((1, msg((1, "base/5/16384"), (2, struct.pack("<QQ", 0x8000_0000_0000_0101, 1)))),
                    (2, msg((1, 1663), (2, 5), (3, 16390))), (3, msg((1, 1663), (2, 16400))),
                    (4, 1), (5, 0x5000000), (6, 1234), (7, 1)))),
        msg((8, msg((1, 0x5000000), (2, 3), (3, 1)))),
        msg((1, msg((1, 9), (2, "the WAL is gone")))),
    ]
    out("wire_messages", "replies-all", b"\x01" + b"".join(delimited(r) for r in replies))
    for i, r in enumerate(replies):
        out("wire_messages", f"reply-{i}", b"\x01" + delimited(replies[0]) + delimited(r))
    # Stored chunks growing into one reused buffer.
    stored = [msg((6, msg((1, "base/5/1"), (3, n), (5, b"a" * n), (6, bytes(32))))) for n in (1000, 1500)]
    out("wire_messages", "replies-stored", b"\x01" + b"".join(delimited(r) for r in stored))
    # Mode 2: a zstd chunk of a page, the hash made right; and a stored one.
    for codec, data in ((1, frame), (0, page[:100])):
        head = bytes([codec]) + struct.pack("<I", 8192 if codec else 100) + bytes([1, 1]) + bytes(33)
        out("wire_messages", f"chunk-{codec}", b"\x02" + head + data)
    # Mode 3: levels 0, 1, 3 and 19 on a page; a bomb at level 1.
    for level in (0, 1, 3, 19):
        out("wire_messages", f"encode-{level}", b"\x03" + bytes([level + 7, 100, 0, 5, 0, 0, 0]) + page[:4096])
    out("wire_messages", "encode-bomb", b"\x03" + bytes([8, 0, 0, 16, 1, 0xFF, 0x3F]) + b"\x00" * 64)
    # Mode 4: two files that differ in a few places, chunks of 16.
    tgt = bytearray(page[:1000])
    tgt[100] ^= 1
    tgt[700:710] = b"x" * 10
    for tamper in range(4):
        out("wire_messages", f"diff-{tamper}",
            b"\x04" + bytes([15, tamper]) + struct.pack("<H", 1200) + page[:1200] + bytes(tgt))


if __name__ == "__main__":
    sys.exit(main())
