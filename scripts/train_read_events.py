#!/usr/bin/env python3
"""Reads a TensorBoard event file without tensorboard: checks every tfrecord's masked CRC-32C
(bitwise CRC, independent of the table-driven Rust one), decodes the Event / Summary protobuf
fields by hand and prints JSON: [{"wall_time", "step", "file_version"?, "scalars": {tag: v}}].

Usage: scripts/train_read_events.py EVENT_FILE
"""
import json
import struct
import sys


def crc32c(data):
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data):
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def varint(buf, i):
    shift = result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return result, i


def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == 0:
            v, i = varint(buf, i)
        elif wire == 1:
            v = buf[i : i + 8]
            i += 8
        elif wire == 5:
            v = buf[i : i + 4]
            i += 4
        elif wire == 2:
            n, i = varint(buf, i)
            v = buf[i : i + n]
            i += n
        else:
            raise ValueError(f"wire type {wire}")
        yield num, wire, v


def main():
    data = open(sys.argv[1], "rb").read()
    i = 0
    events = []
    while i < len(data):
        header = data[i : i + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[i + 8 : i + 12])
        assert hcrc == masked(header), "length CRC mismatch"
        payload = data[i + 12 : i + 12 + n]
        (pcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        assert pcrc == masked(payload), "payload CRC mismatch"
        i += 16 + n
        ev = {"step": 0, "scalars": {}}
        for num, wire, v in fields(payload):
            if num == 1:
                ev["wall_time"] = struct.unpack("<d", v)[0]
            elif num == 2:
                ev["step"] = v
            elif num == 3:
                ev["file_version"] = v.decode()
            elif num == 5:
                for snum, _, sv in fields(v):
                    assert snum == 1
                    tag, val = None, None
                    for vnum, vwire, vv in fields(sv):
                        if vnum == 1:
                            tag = vv.decode()
                        elif vnum == 2 and vwire == 5:
                            val = struct.unpack("<f", vv)[0]
                    ev["scalars"][tag] = val
        events.append(ev)
    print(json.dumps(events))


if __name__ == "__main__":
    main()
