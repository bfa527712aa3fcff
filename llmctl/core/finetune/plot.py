"""``loss.png``: training (blue) and validation (orange) loss against the step.

Drawn with matplotlib when it is installed (axes, labels, legend); otherwise with the small PNG writer
below (lines on white, a grey frame, no text), so the file exists whatever is installed.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

BLUE = (31, 119, 180)
ORANGE = (255, 127, 14)
GREY = (160, 160, 160)


def write_png(path: Path, pixels: list[bytearray], width: int, height: int) -> None:
    """An 8-bit RGB PNG: signature, IHDR, one zlib IDAT (filter 0 per row), IEND."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + bytes(row) for row in pixels)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def _draw(train: list[tuple[int, float]], val: list[tuple[int, float]], width: int, height: int):
    pixels = [bytearray(b"\xff" * (3 * width)) for _ in range(height)]
    margin = 20

    def put(x: int, y: int, color) -> None:
        if 0 <= x < width and 0 <= y < height:
            pixels[y][3 * x : 3 * x + 3] = bytes(color)

    for x in range(margin, width - margin):
        put(x, margin, GREY)
        put(x, height - margin, GREY)
    for y in range(margin, height - margin + 1):
        put(margin, y, GREY)
        put(width - margin, y, GREY)
    points = train + val
    if not points:
        return pixels
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def to_px(step: float, value: float) -> tuple[int, int]:
        px = margin + round((step - x0) / (x1 - x0) * (width - 2 * margin))
        py = height - margin - round((value - y0) / (y1 - y0) * (height - 2 * margin))
        return px, py

    for series, color in ((train, BLUE), (val, ORANGE)):
        coords = [to_px(s, v) for s, v in series]
        for (ax, ay), (bx, by) in zip(coords, coords[1:], strict=False):
            n = max(abs(bx - ax), abs(by - ay), 1)
            for i in range(n + 1):
                put(ax + round((bx - ax) * i / n), ay + round((by - ay) * i / n), color)
        for cx, cy in coords:  # a 3x3 dot per point, so a single point shows
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    put(cx + dx, cy + dy, color)
    return pixels


def plot_losses(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> str:
    """Write the curves to ``path``; returns which backend drew them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        width, height = 640, 400
        write_png(path, _draw(train, val, width, height), width, height)
        return "builtin"
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train", color="#1f77b4")
    if val:
        ax.plot(*zip(*val, strict=True), label="validation", color="#ff7f0e", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"
