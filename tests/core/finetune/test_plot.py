"""loss.png without matplotlib: a valid PNG with both curves drawn."""

from __future__ import annotations

import struct
import zlib

from llmctl.core.finetune.plot import BLUE, ORANGE, _draw, write_png


def read_png(data: bytes) -> tuple[int, int, list[bytes]]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + 3 * width
    rows = [raw[i * stride + 1 : (i + 1) * stride] for i in range(len(raw) // stride)]
    return width, len(rows), rows


def test_builtin_png_writer_draws_train_and_validation_curves(tmp_path):
    path = tmp_path / "loss.png"
    width, height = 200, 120
    write_png(path, _draw([(1, 3.0), (2, 2.0), (3, 1.5)], [(3, 2.5)], width, height), width, height)
    w, h, rows = read_png(path.read_bytes())
    assert (w, h) == (width, height)
    pixels = {bytes(row[i : i + 3]) for row in rows for i in range(0, len(row), 3)}
    assert bytes(BLUE) in pixels and bytes(ORANGE) in pixels
    # the first training point (highest loss, first step) is at the top-left corner of the plot area
    assert bytes(rows[20][3 * 20 : 3 * 21]) == bytes(BLUE)
