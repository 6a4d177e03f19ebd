"""Full-size JPEG decoding straight through libjpeg-turbo (simplejpeg).

PIL decodes JPEGs with libjpeg-turbo too, with the same settings (accurate integer IDCT, fancy
chroma upsampling), so the pixels are identical (tested, baseline and progressive, 4:2:0, 4:4:4
and greyscale); what is saved is PIL's own work around the decoder (its chunked reads, the
image object, the copy into an array): measured on one core, 0.85 ms instead of 1.06 ms for a
500x375 photo, the largest single cost of a training crop. Anything simplejpeg does not take
(CMYK, a corrupt stream, a non-JPEG) goes to PIL, which decodes it or raises the error that
marks the image undecodable, exactly as before.
"""

from __future__ import annotations

import io

import numpy as np
import simplejpeg
import torch
from PIL import Image

# PIL modes of JPEGs whose pixels libjpeg-turbo's RGB output reproduces exactly.
_DIRECT_MODES = ("RGB", "L")
# A progressive JPEG is decoded once per scan: a 200 KB file of thousands of scans costs tens of
# seconds every time it is read. Encoders write about 10 (libjpeg's default progression) to
# ~20 (mozjpeg); libjpeg-turbo's own tools suggest refusing several hundred. 100 keeps every
# ordinary file and bounds a hostile one to about 100 decodes' time.
MAX_JPEG_SCANS = 100
# libjpeg-turbo warnings that mean the stream ended before the image did: libjpeg fills the
# rest with grey and carries on, so the picture would train as (partly) flat grey.
_TRUNCATION_WARNINGS = ("Premature end of JPEG file", "Corrupt JPEG data: premature end of data segment")
_SOI, _EOI, _SOS = b"\xff\xd8", b"\xff\xd9", 0xDA
# Start-of-frame markers (all but DHT 0xC4, JPG 0xC8, DAC 0xCC), and the progressive ones.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}


class CorruptJpeg(ValueError):
    """A JPEG stream that is cut short or has too many scans; it is skipped as corrupt."""


def check_jpeg_stream(data: bytes | memoryview, max_scans: int = MAX_JPEG_SCANS) -> None:
    """Raises CorruptJpeg when the JPEG ``data`` ends before its last scan does (no EOI
    marker after it: a truncated file) or has more than ``max_scans`` scans; anything that is
    not a JPEG, or whose header this does not follow, is left to the decoder.

    Cheap: the header segments are walked by their lengths up to the first scan; a
    single-scan (baseline, interleaved) image then only needs the EOI looked up from the end.
    Only images of several scans have their scan markers counted (vectorised): inside
    entropy-coded data every 0xFF byte is followed by 0x00 or a restart marker, so each
    0xFF 0xDA pair after the first scan starts a scan.
    """
    view = memoryview(data).cast("B")
    if bytes(view[:2]) != _SOI:
        return
    first_scan, single_scan = _first_scan(view)
    if first_scan is None:
        return
    raw = bytes(view) if not isinstance(data, bytes) else data
    if single_scan:
        last_scan = first_scan
    else:
        pixels = np.frombuffer(raw, dtype=np.uint8)
        marks = np.flatnonzero(pixels[first_scan:-1] == 0xFF) + first_scan
        scans = marks[pixels[marks + 1] == _SOS]
        if len(scans) > max_scans:
            raise CorruptJpeg(f"a JPEG of {len(scans)} scans, over the limit of {max_scans}; not decoded "
                              "(each scan is a decode of the whole image)")
        last_scan = int(scans[-1])
    if raw.rfind(_EOI) < last_scan:
        raise CorruptJpeg("a truncated JPEG: its data ends before the end-of-image marker")


def _first_scan(view: memoryview) -> tuple[int | None, bool]:
    """(offset of the first SOS marker, whether the frame is one interleaved sequential scan),
    or (None, False) where the header does not parse as expected."""
    position, end = 2, len(view)
    progressive, components = False, 0
    while position + 4 <= end:
        if view[position] != 0xFF:
            return None, False
        marker = view[position + 1]
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker == _EOI[1]:
            raise CorruptJpeg("a JPEG that ends before any image data")
        if marker == _SOS:
            scan_components = view[position + 4] if position + 4 < end else 0
            return position, (not progressive and scan_components == components)
        if marker in _SOF_MARKERS and position + 9 < end:
            progressive = marker in _PROGRESSIVE_SOF
            components = view[position + 9]
        position += 2 + int.from_bytes(view[position + 2:position + 4], "big")
    raise CorruptJpeg("a truncated JPEG: its data ends inside the header")


def encoded_jpeg(img: Image.Image) -> memoryview | None:
    """The bytes of an opened, not yet decoded in-memory JPEG whose pixels simplejpeg gives as
    PIL would; None for anything else. Only for images not drafted (``Image.draft``)."""
    if img.format != "JPEG" or img.mode not in _DIRECT_MODES or not getattr(img, "tile", None):
        return None  # not a JPEG, a mode libjpeg-turbo's RGB does not reproduce, or decoded already
    source = getattr(img, "fp", None)
    return source.getbuffer() if isinstance(source, io.BytesIO) else None


def decode_jpeg_rgb(data: memoryview | bytes) -> torch.Tensor | None:
    """uint8 (H, W, 3) RGB of a whole JPEG at full size, or None where libjpeg-turbo refuses it
    (the caller then asks PIL). CorruptJpeg where the stream ends before the image does: PIL
    would decode the rest as grey without a word."""
    try:
        return torch.from_numpy(simplejpeg.decode_jpeg(data, colorspace="RGB"))
    except ValueError as exc:
        if str(exc).startswith(_TRUNCATION_WARNINGS):
            raise CorruptJpeg(f"a truncated JPEG ({exc})") from None
        return None
