"""Robust image decoding: encoded bytes -> uint8 ``[R, R, 3]`` (short side resized to R, centre crop).

One function, :func:`decode_batch`, is used by every path (the Ray Data ``map_batches`` stage, the no-Ray
:func:`replab.platform.data.load_arrays`, and :func:`replab.platform.data.inspect`), so a file that trains
also evaluates, and a file that is skipped is skipped everywhere with the same reason.

What is decoded (converted to RGB):

- RGB, grayscale (``L``, ``1``), ``CMYK`` (incl. Adobe inverted CMYK JPEG), ``YCbCr``, ``LAB``, ``HSV``;
- images with alpha (``RGBA``, ``LA``, ``PA``, palette ``P`` with a transparency entry): composited on white,
  so transparent regions do not turn black;
- 16-bit and 32-bit grayscale (``I;16*``, ``I``, ``F``): scaled to 8 bit (16-bit range -> >> 8), not clipped;
- EXIF orientation is applied (cheaply, on the final R x R crop: the centre crop commutes with the transpose);
- huge images: JPEG is decoded with :meth:`PIL.Image.Image.draft` (DCT-domain downscale by 1/2, 1/4 or 1/8,
  so a 12000 x 9000 JPEG decodes as 1500 x 1125) even when its header exceeds Pillow's decompression-bomb
  limit; any other image whose pixel count exceeds :data:`MAX_PIXELS` after drafting is skipped.

What is skipped, with a one-word category (``reason.split(":")[0]``) and a short detail:
``empty``, ``not-an-image``, ``truncated``, ``corrupt``, ``too-large``, ``unsupported-mode``, ``error``.
Nothing raises: every failure of one image is caught and reported per row, so one bad file never fails a
Ray Data block (``DataContext.max_errored_blocks`` is 0).

Resize: Pillow ``resize`` with a source ``box`` = the centred square of side ``min(w, h)`` straight to R x R
(equivalent to "resize the short side to R, centre-crop R x R", in one pass), bilinear filter with Pillow's
area-aware antialiasing when downscaling (torchvision's ``Resize(antialias=True)`` default).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, JpegImagePlugin

MAX_PIXELS: int = Image.MAX_IMAGE_PIXELS or 89_478_485
"""Largest image (in pixels, after JPEG drafting) that is decoded; larger ones are skipped as ``too-large``."""

RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
"""Pillow first box-reduces by an integer factor while the remaining scale stays >= 3x (visually lossless,
much faster for large non-JPEG images)."""

# Per-image chatter from Pillow (decompression-bomb size warnings: handled above; palette transparency,
# corrupt EXIF ...) is silenced with narrow process-wide filters: ``warnings.catch_warnings`` would be cheaper
# to reason about but is not thread-safe, and load_arrays decodes in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\..*)?$")

DECODE_VERSION = 1
"""Bump when the decoded pixels change (keys the on-disk array cache)."""

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_DIRECT_MODES = {"L", "1", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class SkipImage(Exception):
    """One image cannot be decoded; ``reason`` is ``"category: detail"``."""

    def __init__(self, category: str, detail: str = ""):
        self.category = category
        self.reason = f"{category}: {detail}" if detail else category
        super().__init__(self.reason)


def _open(data: bytes) -> Image.Image:
    if data is None or len(data) == 0:
        raise SkipImage("empty", "0 bytes")
    try:
        if bytes(data[:3]) == b"\xff\xd8\xff":
            # JPEG (the common case): skip Pillow's format probing. This also skips Pillow's
            # decompression-bomb check, which is done after drafting in decode_image instead.
            return JpegImagePlugin.JpegImageFile(io.BytesIO(data))
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise SkipImage("too-large", "exceeds the decompression-bomb limit") from None
    except Image.UnidentifiedImageError:
        raise SkipImage("not-an-image", f"{len(data)} bytes, unknown format") from None
    except Exception as exc:  # noqa: BLE001  (SyntaxError, struct.error, OSError from broken headers ...)
        raise SkipImage("corrupt", f"{type(exc).__name__}: {exc}") from None


def _high_bit_depth_to_l(im: Image.Image) -> Image.Image:
    arr = np.asarray(im)
    if im.mode.startswith("I;16"):
        arr8 = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    elif im.mode == "F":
        hi = float(np.nanmax(arr)) if arr.size else 0.0
        scale = 255.0 if hi <= 1.0 else 1.0
        arr8 = np.clip(np.nan_to_num(arr) * scale, 0, 255).astype(np.uint8)
    else:  # "I" (32-bit signed; Pillow uses it for some 16-bit PNG/TIFF)
        hi = int(arr.max()) if arr.size else 0
        if hi > 255:
            arr8 = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        else:
            arr8 = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        if "transparency" in im.info:
            im, mode = im.convert("RGBA"), "RGBA"
        else:
            return im.convert("RGB")
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_bit_depth_to_l(im).convert("RGB")
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise SkipImage("unsupported-mode", f"{mode}: {exc}") from None


def decode_image(data: bytes, resolution: int) -> np.ndarray:
    """Decode one encoded image to uint8 ``[resolution, resolution, 3]``; raises :class:`SkipImage`."""
    im = _open(data)
    try:
        width, height = im.size
        if width <= 0 or height <= 0:
            raise SkipImage("corrupt", f"size {width}x{height}")
        # Region of the (possibly drafted) image that corresponds to the full original image.
        src_w, src_h = float(width), float(height)
        if im.format == "JPEG" and min(width, height) >= 2 * resolution:
            drafted = im.draft(None, (resolution, resolution))
            if drafted is not None:
                _, box = drafted
                src_w, src_h = box[2], box[3]
                width, height = im.size
        if width * height > MAX_PIXELS:
            raise SkipImage("too-large", f"{width}x{height} pixels (limit {MAX_PIXELS})")
        orientation = 1
        if "exif" in im.info:
            try:
                orientation = int(im.getexif().get(0x0112, 1))
            except Exception:  # noqa: BLE001  (a broken EXIF block is not a broken image)
                orientation = 1
        try:
            im.load()
        except SkipImage:
            raise
        except OSError as exc:
            text = str(exc)
            category = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
            raise SkipImage(category, text) from None
        except Exception as exc:  # noqa: BLE001  (SyntaxError, ValueError, EOFError, struct.error, ...)
            raise SkipImage("corrupt", f"{type(exc).__name__}: {exc}") from None
        im = _to_rgb(im)
        side = min(src_w, src_h)
        if (width, height) != (resolution, resolution):
            left, top = (src_w - side) / 2.0, (src_h - side) / 2.0
            im = im.resize(
                (resolution, resolution),
                RESAMPLE,
                box=(left, top, left + side, top + side),
                reducing_gap=REDUCING_GAP if side >= 3 * resolution else None,
            )
        if orientation in _ORIENTATION:
            im = im.transpose(_ORIENTATION[orientation])
        arr = np.asarray(im)
        if arr.shape != (resolution, resolution, 3) or arr.dtype != np.uint8:
            raise SkipImage("error", f"unexpected decoded shape {arr.shape} {arr.dtype}")
        return arr
    finally:
        try:
            im.close()
        except Exception:  # noqa: BLE001
            pass


def decode_batch(
    items: Sequence[bytes | None], resolution: int
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Decode a batch; never raises for a bad image.

    Returns ``(images, ok, reasons)``: ``images`` uint8 ``[ok.sum(), R, R, 3]`` (only the decoded rows, in
    order), ``ok`` a bool mask over the inputs and ``reasons[i]`` the skip reason of input ``i`` (None when
    decoded).
    """
    n = len(items)
    out = np.empty((n, resolution, resolution, 3), dtype=np.uint8)
    ok = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n
    for i, data in enumerate(items):
        try:
            out[i] = decode_image(data, resolution)
            ok[i] = True
        except SkipImage as exc:
            reasons[i] = exc.reason
        except MemoryError:
            reasons[i] = "too-large: out of memory while decoding"
        except Exception as exc:  # noqa: BLE001  (never let one image fail the batch)
            reasons[i] = f"error: {type(exc).__name__}: {exc}"
    if ok.all():
        return out, ok, reasons
    return out[ok], ok, reasons


def category(reason: str | None) -> str:
    """``"truncated: image file is truncated"`` -> ``"truncated"``."""
    return "" if reason is None else reason.split(":", 1)[0]
