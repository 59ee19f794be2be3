"""A fast path for decoding plain JPEGs (most image datasets are small JPEGs).

`decode_plain_jpeg` reads the JPEG markers itself and hands the bytes to PIL's own
libjpeg decoder, skipping `Image.open`'s Python-level marker parsing: about twice as
fast for tiny images, and the pixels are identical (same decoder, same arguments).
"""
from __future__ import annotations

from PIL import Image

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # start-of-frame markers


def decode_plain_jpeg(data: bytes, max_pixels: int) -> Image.Image | None:
    """A 3-component JPEG as an RGB image, or None for anything else (not a JPEG,
    grayscale, CMYK, Adobe APP14, truncated, corrupt, over `max_pixels` pixels): the
    caller then goes through `Image.open`, which also produces the error message."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        m = data[i + 1]
        if m == 0xFF:
            i += 1
            continue
        if m == 0x01 or 0xD0 <= m <= 0xD8:
            i += 2
            continue
        if m == 0xEE:  # Adobe colour-transform conventions: leave to PIL
            return None
        if m in _SOF:
            if i + 10 > n or data[i + 9] != 3:
                return None
            h, w = (data[i + 5] << 8) | data[i + 6], (data[i + 7] << 8) | data[i + 8]
            if not (0 < w <= 4096 and 0 < h <= 4096) or w * h > max_pixels:
                return None
            im = Image.new("RGB", (w, h))
            dec = Image.core.jpeg_decoder("RGB", "RGB", "")
            try:
                dec.setimage(im.im, (0, 0, w, h))
                consumed, err = dec.decode(data)
            finally:
                dec.cleanup()
            return im if consumed < 0 and err >= 0 else None
        i += 2 + ((data[i + 2] << 8) | data[i + 3])
    return None
