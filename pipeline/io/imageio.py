"""The one safe image loader (and atomic writer) used by the daemon, the CLI and LoRA training.

Every image that enters Product Studio goes through :func:`load_image`. It either returns a
:class:`LoadedImage` whose ``image`` is a fully decoded ``PIL.Image.Image`` in mode ``"RGB"`` or
``"RGBA"`` (8 bits per channel, values 0..255, channel order R, G, B[, A]) with the EXIF orientation
already applied, or it raises :class:`ImageLoadError`. No other exception type, and no Pillow
decompression-bomb warning, escapes for a bad input, so callers need one ``except`` clause to skip a
file and log ``str(err)`` (``"<path>: <reason>"``).

Writes go through :func:`save_image`, :func:`atomic_write_bytes` and :func:`atomic_write_text`,
which write a hidden temporary file next to the target, fsync it and rename it over the target, so
a crash or a full disk never leaves a half-written output where the watcher or the ledger could see
it.

Import cost is kept low on purpose (stdlib, numpy and Pillow only); ``PIL.ImageCms`` (LittleCMS) is
imported only when a CMYK image with an embedded profile needs it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Union

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import BadInput

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "ImageLoadError",
    "LoadedImage",
    "atomic_write_bytes",
    "atomic_write_text",
    "is_image_name",
    "load_image",
    "looks_incomplete",
    "save_image",
    "to_rgb_array",
]

DEFAULT_MAX_PIXELS = 64_000_000
# GIF: the first frame (the frame count is reported). HEIF (HEIC, what phones shoot) is decoded by
# the pillow-heif plugin, registered on first use; AVIF by Pillow's own plugin (Pillow >= 11.3).
ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "TIFF", "BMP", "GIF", "HEIF", "AVIF"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp", ".gif", ".heic", ".heif",
                            ".avif"})
# ISO-BMFF brands (the ``ftyp`` box) of HEIF still images and sequences.
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1",
                          b"msf1"})

PathLike = Union[str, os.PathLike]

_EXIF_ORIENTATION = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow names a multi-picture JPEG (what most phones and cameras write) "MPO". It is a JPEG
# file in every way that matters here, so it must pass a "JPEG" allow-list and be reported as such.
_FORMAT_ALIASES = {"MPO": "JPEG"}
_SAVE_FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}
_BOMB_PIXELS_RE = re.compile(r"\((\d+) pixels\)")


class ImageLoadError(BadInput):
    """One error type for every unreadable input.

    Attributes: ``path`` (the file path or the ``name`` given for bytes input, else None) and
    ``reason`` (a short human-readable explanation). ``str(err)`` is ``f"{path}: {reason}"``, with
    ``<bytes>`` standing in for a None path.
    """

    def __init__(self, path: str | None, reason: str):
        # Both go to Exception.args so that they survive pickling (multiprocessing workers re-raise it).
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path if self.path is not None else '<bytes>'}: {self.reason}"


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, normalised input image.

    ``image``: fully loaded ``PIL.Image.Image``, mode ``"RGB"`` or ``"RGBA"`` only (uint8 per
    channel, 0..255, RGB order, straight not premultiplied alpha), EXIF orientation already applied
    so the pixels are upright. Alpha is present only when at least one pixel is not fully opaque.
    ``image.info["icc_profile"]`` matches ``icc_profile``.

    ``format`` is Pillow's format name of the source (``"JPEG"``, ``"PNG"``, ...; MPO reads as
    ``"JPEG"``). ``original_mode`` is the Pillow mode as decoded (``"CMYK"``, ``"I;16"``, ``"P"``...).
    ``icc_profile`` is the profile that describes ``image``'s RGB pixels (the source one, or sRGB
    after a colour-managed CMYK conversion), or None. ``sha256`` is the hex digest of the raw input
    bytes. ``exif_transposed`` is True when an EXIF orientation other than 1 was applied.
    ``frames`` is the number of frames (images) in the file; ``image`` is always the first.
    """

    image: Image.Image
    path: str | None
    format: str
    original_mode: str
    icc_profile: bytes | None
    sha256: str
    exif_transposed: bool
    frames: int = 1

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` in pixels, after orientation."""
        return self.image.size

    @property
    def has_alpha(self) -> bool:
        """True when ``image`` is RGBA (i.e. some pixel is not fully opaque)."""
        return self.image.mode == "RGBA"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_image(
    source: str | os.PathLike | bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    allowed_formats: Iterable[str] = ALLOWED_FORMATS,
    name: str | None = None,
) -> LoadedImage:
    """Read, verify, decode and normalise one image.

    ``source`` is a file path or the raw file bytes (``bytes``/``bytearray``/``memoryview``). The
    bytes are read once; ``sha256`` is taken over exactly those bytes. ``name`` is the label used
    as ``path`` in the result and in errors (defaults to the file path; None for bytes input).

    The pixel count is checked against ``max_pixels`` from the header, before any pixel data is
    decoded. Pillow's own ``Image.MAX_IMAGE_PIXELS`` warning is silenced for the duration of the
    call (our limit replaces it); its hard error (at twice that limit) still applies and is reported
    as an ``ImageLoadError``. ``allowed_formats`` are Pillow format names (case-insensitive).
    Multi-frame files yield frame 0.

    Returns a :class:`LoadedImage` whose image is mode RGB or RGBA, uint8 0..255, upright. Raises
    :class:`ImageLoadError` for any unreadable input, :class:`TypeError`/:class:`ValueError` only
    for invalid arguments.
    """
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(allowed_formats, str):
        allowed_formats = [allowed_formats]
    allowed = frozenset(_canonical_format(str(f)) for f in allowed_formats)

    label, data = _read_source(source, name)
    if not data:
        raise ImageLoadError(label, "empty file (0 bytes)")
    digest = hashlib.sha256(data).hexdigest()

    # Our own header-size check below is the limit that counts, so Pillow's softer warning is
    # noise; silencing it locally avoids touching Image.MAX_IMAGE_PIXELS. Caveat: before Python
    # 3.14 catch_warnings swaps a process-wide list, so loads racing in threads can at worst leave
    # this one "ignore DecompressionBombWarning" filter installed after they finish.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = _open(data, label, max_pixels)
        try:
            fmt = _canonical_format(im.format or "")
            if fmt not in allowed:
                raise ImageLoadError(
                    label,
                    f"format {fmt or 'unknown'} not allowed (allowed: {', '.join(sorted(allowed))})",
                )
            # image.size is known from the header; nothing has been decoded yet.
            _check_pixels(label, im.size, max_pixels)
            try:
                # GIF counts by walking the frame headers (no pixel decoding), then seeks back to 0.
                frames = max(1, int(getattr(im, "n_frames", 1) or 1))
            except Exception as exc:
                raise ImageLoadError(label, f"truncated or corrupt image data: {_describe(exc)}") from exc
            # Pillow's TIFF plugin applies (and deletes) the orientation tag itself while loading,
            # so remember it from the already-parsed IFD to report exif_transposed truthfully.
            pre_load_orientation = _tiff_orientation(im)
            try:
                # Full decode here, with ImageFile.LOAD_TRUNCATED_IMAGES left at False, so a cut-off
                # upload fails now instead of yielding grey bands later in the pipeline.
                im.load()
            except Image.DecompressionBombError as exc:
                raise ImageLoadError(label, _bomb_reason(exc, max_pixels)) from exc
            except Exception as exc:  # Pillow plugins raise OSError, SyntaxError, struct.error, ...
                raise ImageLoadError(label, f"truncated or corrupt image data: {_describe(exc)}") from exc
            # Some decoders settle the real size only while loading; never trust the header alone.
            _check_pixels(label, im.size, max_pixels)

            original_mode = im.mode
            source_icc = im.info.get("icc_profile") or None
            try:
                upright, transposed = _apply_exif_orientation(im)
                transposed = transposed or pre_load_orientation in _ORIENTATION_TRANSPOSE
                image, icc = _normalise(upright, bytes(source_icc) if source_icc else None)
            except _UnsupportedMode as exc:
                raise ImageLoadError(label, str(exc)) from exc
            except Exception as exc:
                raise ImageLoadError(
                    label, f"cannot convert mode {original_mode} to RGB: {_describe(exc)}"
                ) from exc
        except BaseException:
            im.close()
            raise

    _set_clean_info(image, icc)
    if image is not im:
        # Releases the reference to the input buffer and any extra frames.
        im.close()
    return LoadedImage(
        image=image,
        path=label,
        format=fmt,
        original_mode=original_mode,
        icc_profile=icc,
        sha256=digest,
        exif_transposed=transposed,
        frames=frames,
    )


def read_file_bytes(path: PathLike) -> bytes:
    """The raw bytes of an input file, with the loader's checks (regular file, no FIFO or device, clear
    messages). For callers that ship inputs elsewhere to be decoded (the Ray engine's coordinator):
    raises :class:`ImageLoadError` with the same reason :func:`load_image` would give."""
    return _read_source(path, None)[1]


def _read_source(source: str | os.PathLike | bytes, name: str | None) -> tuple[str | None, bytes]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return name, bytes(source)
    try:
        path = os.fspath(source)
    except TypeError:
        raise TypeError(f"source must be a path or bytes, got {type(source).__name__}") from None
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    label = name if name is not None else path
    try:
        # stat first: opening a FIFO or device for reading could block or never end.
        st = os.stat(path)
    except FileNotFoundError:
        raise ImageLoadError(label, "file not found") from None
    except PermissionError:
        raise ImageLoadError(label, "permission denied") from None
    except (OSError, ValueError) as exc:  # ValueError: embedded NUL in the path
        raise ImageLoadError(label, f"cannot access file: {_describe(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ImageLoadError(label, "is a directory, not an image file")
    if not stat.S_ISREG(st.st_mode):
        raise ImageLoadError(label, "not a regular file")
    try:
        with open(path, "rb") as fh:
            return label, fh.read()
    except FileNotFoundError:  # removed between stat and open
        raise ImageLoadError(label, "file not found") from None
    except PermissionError:
        raise ImageLoadError(label, "permission denied") from None
    except OSError as exc:
        raise ImageLoadError(label, f"cannot read file: {_describe(exc)}") from None


def _is_heif(head: bytes) -> bool:
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


@functools.lru_cache(maxsize=1)
def _register_heif() -> str | None:
    """Register the pillow-heif plugin once; None when done, else why it cannot be."""
    try:
        import pillow_heif
    except ImportError as exc:
        return f"HEIC/HEIF needs the pillow-heif package, which is not installed ({exc})"
    pillow_heif.register_heif_opener()
    return None


def _open(data: bytes, label: str | None, max_pixels: int) -> Image.Image:
    if _is_heif(data[:12]):
        problem = _register_heif()
        if problem:
            raise ImageLoadError(label, problem)
    try:
        return Image.open(io.BytesIO(data))
    except Image.UnidentifiedImageError:
        raise ImageLoadError(label, "not a recognised image") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, _bomb_reason(exc, max_pixels)) from exc
    except Exception as exc:
        raise ImageLoadError(label, f"truncated or corrupt image data: {_describe(exc)}") from exc


def _check_pixels(label: str | None, size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageLoadError(label, f"image has no pixels ({width}x{height})")
    pixels = width * height
    if pixels > max_pixels:
        raise ImageLoadError(label, _pixels_reason(pixels, max_pixels))


def _pixels_reason(pixels: int, max_pixels: int) -> str:
    return f"image has {pixels:,} pixels, limit is {max_pixels:,} (decompression-bomb guard)"


def _bomb_reason(exc: Exception, max_pixels: int) -> str:
    # Pillow refuses at 2 * MAX_IMAGE_PIXELS before we get to see the size; its message has it.
    match = _BOMB_PIXELS_RE.search(str(exc))
    if match:
        return _pixels_reason(int(match.group(1)), max_pixels)
    return f"image exceeds Pillow's pixel limit (decompression-bomb guard): {exc}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return text or type(exc).__name__


def _canonical_format(fmt: str) -> str:
    fmt = fmt.upper()
    return _FORMAT_ALIASES.get(fmt, fmt)


def _tiff_orientation(im: Image.Image) -> object:
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    try:
        value = tags.get(_EXIF_ORIENTATION)
    except Exception:
        return None
    return value if isinstance(value, int) else None


def _apply_exif_orientation(im: Image.Image) -> tuple[Image.Image, bool]:
    """Return ``(upright_image, transposed)``; the upright image has no orientation tag left."""
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        method = _ORIENTATION_TRANSPOSE.get(orientation)
    except Exception:
        # Unparseable EXIF on decodable pixels: show the image as stored rather than reject it.
        return im, False
    if method is None:
        return im, False
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:
        # exif_transpose re-serialises the EXIF block, which can fail on odd vendor data. The
        # pixels still need turning; drop the metadata so nothing can re-apply the rotation.
        upright = im.transpose(method)
        for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"):
            upright.info.pop(key, None)
    return upright, True


class _UnsupportedMode(Exception):
    pass


def _normalise(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    """Convert a decoded image of any supported mode to RGB/RGBA uint8 and pick the matching ICC.

    Returns ``(image, icc_profile)``. The profile is kept only if it describes RGB data (a CMYK or
    grey profile attached to RGB pixels would make colour-managed viewers render them wrongly).
    """
    mode = im.mode
    has_trns = im.info.get("transparency") is not None
    out_icc = icc if _icc_colour_space(icc) == b"RGB " else None

    if mode == "RGBA":
        out = im
    elif mode == "RGB":
        out = im.convert("RGBA") if has_trns else im
    elif mode in ("RGBa", "LA", "PA"):
        out = im.convert("RGBA")
    elif mode in ("1", "L"):
        out = im.convert("RGBA" if has_trns else "RGB")
    elif mode == "P":
        rgba_palette = im.palette is not None and im.palette.mode == "RGBA"
        out = im.convert("RGBA" if (has_trns or rgba_palette) else "RGB")
    elif mode in ("RGBX", "YCbCr", "LAB", "HSV"):
        out = im.convert("RGB")
    elif mode == "CMYK":
        out, out_icc = _cmyk_to_rgb(im, icc)
    elif mode == "I" or mode.startswith("I;16"):
        out = _integer_grey_to_rgb(im)
    elif mode == "F":
        out = _float_grey_to_rgb(im)
    else:
        raise _UnsupportedMode(f"unsupported image mode {mode}")

    if out.mode == "RGBA" and out.getchannel("A").getextrema() == (255, 255):
        # Fully opaque alpha carries no information and would make every later stage pay for it.
        out = out.convert("RGB")
    return out, out_icc


def _icc_colour_space(icc: bytes | None) -> bytes | None:
    # ICC header: bytes 16..20 are the data colour space signature ("RGB ", "CMYK", "GRAY", ...).
    if not icc or len(icc) < 128:
        return None
    return bytes(icc[16:20])


@functools.lru_cache(maxsize=1)
def colour_space(icc: bytes | None) -> str:
    """``"sRGB"``, ``"untagged"`` or the ICC profile's description."""
    if not icc:
        return "untagged"
    try:
        from PIL import ImageCms

        desc = ImageCms.getProfileDescription(ImageCms.ImageCmsProfile(io.BytesIO(icc))).strip()
    except Exception:  # an unreadable embedded profile: say so rather than guess
        return "unreadable ICC profile"
    return "sRGB" if "srgb" in desc.lower().replace(" ", "") else desc


def _srgb_profile_bytes() -> bytes:
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> tuple[Image.Image, bytes | None]:
    if _icc_colour_space(icc) == b"CMYK":
        try:
            from PIL import ImageCms

            srgb = ImageCms.ImageCmsProfile(io.BytesIO(_srgb_profile_bytes()))
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            converted = ImageCms.profileToProfile(im, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted, _srgb_profile_bytes()
        except Exception:
            # A broken embedded profile should cost colour accuracy, not the whole image.
            pass
    # Naive conversion: the pixels are no longer described by any profile we hold.
    return im.convert("RGB"), None


def _integer_grey_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit greyscale -> 8-bit RGB (RGBA where a tRNS grey value is set).

    I;16* are scaled 0..65535 -> 0..255 (rounded). Mode "I" is int32: values within 0..65535 (the
    usual case: 16-bit PNG/TIFF) are scaled as 16-bit; larger non-negative values as 0..2**31-1;
    negative values as the full signed range. Pillow's own convert would clip at 255 instead.
    """
    raw = np.asarray(im)
    wide = raw.astype(np.int64)
    lo = int(wide.min())
    hi = int(wide.max())
    if im.mode != "I" or (lo >= 0 and hi <= 0xFFFF):
        full, offset = 0xFFFF, 0
    elif lo >= 0:
        full, offset = 2**31 - 1, 0
    else:
        full, offset = 2**32 - 1, 2**31
    grey = ((wide + offset) * 255 + full // 2) // full
    grey = grey.astype(np.uint8)

    trns = im.info.get("transparency")
    if isinstance(trns, int) and not isinstance(trns, bool):
        alpha = np.where(wide == trns, 0, 255).astype(np.uint8)
        return Image.fromarray(np.dstack([grey, grey, grey, alpha]))
    return Image.fromarray(np.dstack([grey, grey, grey]))


def _float_grey_to_rgb(im: Image.Image) -> Image.Image:
    """32-bit float greyscale -> 8-bit RGB.

    Data whose finite maximum is <= 1 is taken as 0..1, anything else as 0..255; values outside the
    range are clipped, NaN becomes 0, +inf the top of the range.
    """
    values = np.asarray(im, dtype=np.float64)
    finite = np.isfinite(values)
    top = 1.0 if (not finite.any() or float(values[finite].max()) <= 1.0) else 255.0
    values = np.nan_to_num(values, nan=0.0, posinf=top, neginf=0.0)
    grey = np.rint(np.clip(values * (255.0 / top), 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, grey, grey]))


def _set_clean_info(image: Image.Image, icc: bytes | None) -> None:
    # Stale keys would be written back by a later image.save(): a palette transparency index on
    # RGB pixels, or a CMYK profile on sRGB pixels.
    image.info.pop("transparency", None)
    if icc:
        image.info["icc_profile"] = icc
    else:
        image.info.pop("icc_profile", None)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Return the pixels as a new, writable, C-contiguous ``numpy.ndarray`` of shape ``(H, W, 3)``,
    dtype ``uint8``, values 0..255, channel order R, G, B.

    Alpha is dropped, not composited (the colour under transparent pixels is returned as stored).
    Modes other than RGB/RGBA are normalised as :func:`load_image` does (16-bit grey scaled, CMYK
    converted, ...).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
    if image.mode not in ("RGB", "RGBA"):
        image, _ = _normalise(image, image.info.get("icc_profile"))
    if image.mode == "RGBA":
        image = image.convert("RGB")
    return np.ascontiguousarray(np.array(image, dtype=np.uint8))


def looks_incomplete(path: PathLike) -> bool:
    """True when the file's bytes end before its image does: a JPEG without its end marker, a PNG
    without ``IEND``, a GIF without its trailer, a WebP / BMP shorter than its header says, a
    HEIF / AVIF whose last box runs past the end, a TIFF whose strips or tiles do. Reads headers
    and the last few KB only, never pixel data (for intake: an upload that paused). False for
    anything else and for unreadable files: the loader decides those."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(32)
            size = os.fstat(fh.fileno()).st_size
            fh.seek(max(0, size - 4096))
            tail = fh.read(4096)
    except OSError:
        return False
    if head[:2] == b"\xff\xd8":
        # Some writers pad after the end marker.
        return not tail.rstrip(b"\x00").endswith(b"\xff\xd9")
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return not tail.endswith(b"IEND\xaeB`\x82")
    if head[:4] == b"GIF8":
        return not tail.rstrip(b"\x00").endswith(b";")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return int.from_bytes(head[4:8], "little") + 8 > size
    if head[:2] == b"BM" and len(head) >= 6:
        declared = int.from_bytes(head[2:6], "little")
        return declared > size
    if head[4:8] == b"ftyp":
        return _bmff_incomplete(path, size)
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_incomplete(path, size)
    return False


def _bmff_incomplete(path: PathLike, size: int) -> bool:
    # HEIF/AVIF are ISO-BMFF: top-level boxes back to back; a cut-off file ends inside the last one.
    off = 0
    with open(path, "rb") as fh:
        for _ in range(10_000):
            if off >= size:
                return False
            fh.seek(off)
            hdr = fh.read(16)
            if len(hdr) < 8:
                return True
            box = int.from_bytes(hdr[:4], "big")
            if box == 1:
                if len(hdr) < 16:
                    return True
                box = int.from_bytes(hdr[8:16], "big")
            elif box == 0:
                return False  # "to the end of the file": nothing to compare
            if box < 8:
                return False  # corrupt, not cut off: the loader says so
            if off + box > size:
                return True
            off += box
    return False


def _tiff_incomplete(path: PathLike, size: int) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about a directory cut short: we answer that
            with Image.open(path) as im:
                tags = im.tag_v2
                offsets = tags.get(273) or tags.get(324) or ()
                counts = tags.get(279) or tags.get(325) or ()
    except Exception:
        return True  # a TIFF signature whose directory cannot be read yet
    if isinstance(offsets, int):
        offsets = (offsets,)
    if isinstance(counts, int):
        counts = (counts,)
    return any(o + c > size for o, c in zip(offsets, counts))


def is_image_name(path: PathLike) -> bool:
    """True when the file name ends in one of :data:`IMAGE_SUFFIXES` (case-insensitive)."""
    return Path(os.fspath(path)).suffix.lower() in IMAGE_SUFFIXES


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_image(
    image: Image.Image | np.ndarray,
    path: PathLike,
    *,
    format: str | None = None,
    icc_profile: bytes | None = None,
    quality: int = 95,
    options: dict[str, object] | None = None,
) -> Path:
    """Encode ``image`` and write it atomically to ``path``; return ``Path(path)``.

    ``image`` is a ``PIL.Image.Image`` or a ``numpy.ndarray``: ``(H, W)`` uint8 -> L,
    ``(H, W, 3)`` uint8 RGB, ``(H, W, 4)`` uint8 RGBA (straight alpha), or ``(H, W)`` bool -> L
    mask with False=0, True=255.

    ``format`` is a Pillow format name (``"JPEG"``/``"JPG"``, ``"PNG"``, ``"WEBP"``, ``"TIFF"``...);
    by default it follows the file suffix. JPEG has no alpha, so images with alpha are composited
    on white first. ``quality`` (1..100) applies to JPEG and WEBP; PNG uses Pillow's default
    compression; ``options`` are passed to Pillow's encoder as they are (e.g. ``lossless`` for
    WEBP/AVIF). ``icc_profile`` is embedded when given; when None, ``image.info["icc_profile"]``
    is used if present (``b""`` writes none). The parent folder is created if missing. An unknown
    format raises ``ValueError`` before anything is written; on any failure the previous file at
    ``path`` is left untouched and no temporary file remains.
    """
    target = Path(os.fspath(path))
    fmt = _resolve_save_format(format, target)
    pil = _as_pil(image)
    # Read before flattening: the flattened copy starts with empty info.
    icc = icc_profile if icc_profile is not None else pil.info.get("icc_profile")
    if fmt == "JPEG":
        pil = _flatten_for_jpeg(pil)

    params: dict[str, object] = {}
    if fmt in ("JPEG", "WEBP", "AVIF"):
        params["quality"] = int(quality)
    params.update(options or {})
    if icc:
        params["icc_profile"] = bytes(icc)

    def write(fh: BinaryIO) -> None:
        pil.save(fh, format=fmt, **params)

    return _atomic_write(target, write)


def _resolve_save_format(format: str | None, target: Path) -> str:
    Image.init()
    if format:
        fmt = format.upper()
        fmt = _SAVE_FORMAT_ALIASES.get(fmt, fmt)
        if fmt not in Image.SAVE:
            raise ValueError(f"unknown or unwritable image format {format!r}")
        return fmt
    suffix = target.suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot tell the image format from the name {target.name!r}; pass format=")
    return fmt


def _as_pil(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a PIL.Image.Image or numpy.ndarray, got {type(image).__name__}")
    arr = image
    if arr.dtype == np.bool_:
        if arr.ndim != 2:
            raise ValueError(f"bool arrays must be (H, W) masks, got shape {arr.shape}")
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise TypeError(f"expected a uint8 (or bool mask) array, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (3, 4))):
        raise ValueError(f"expected shape (H, W), (H, W, 3) or (H, W, 4), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"cannot save an empty image of shape {arr.shape}")
    return Image.fromarray(np.ascontiguousarray(arr))


def _flatten_for_jpeg(im: Image.Image) -> Image.Image:
    needs_alpha = im.mode in ("RGBA", "RGBa", "LA", "La", "PA") or (
        im.mode in ("P", "L", "RGB") and im.info.get("transparency") is not None
    )
    if needs_alpha:
        rgba = im.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba.convert("RGB"), (0, 0), rgba.getchannel("A"))
        return flat
    if im.mode == "P":
        return im.convert("RGB")
    return im


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); return ``Path(path)``."""
    payload = bytes(data)
    return _atomic_write(Path(os.fspath(path)), lambda fh: fh.write(payload))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` UTF-8 encoded to ``path`` atomically; newlines are written unchanged."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Run ``write(fh)`` into a hidden temp file beside ``target``, then rename it over ``target``
    (:func:`atomic_path`)."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        write(fh)
    return target


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """A hidden temp path beside ``path`` for a writer that wants a file name (safetensors, torch,
    diffusers); on a clean exit the file is fsynced, given the permissions a plain ``open()``
    would, and renamed over ``path``; on an error it is removed and ``path`` is untouched.

    The temp file lives in the same folder so ``os.replace`` is a same-filesystem atomic rename:
    readers see either the old file or the complete new one, never a partial write.
    """
    target = Path(os.fspath(path))
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    mode = _new_file_mode(target)
    fd, tmp_name = tempfile.mkstemp(dir=parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    try:
        yield Path(tmp_name)
        fd = os.open(tmp_name, os.O_RDONLY)
        try:
            # mkstemp creates 0600; give the result the permissions a plain open() would.
            if hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(parent)


def _new_file_mode(target: Path) -> int:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        return 0o666 & ~_current_umask()


def _current_umask() -> int:
    # os.umask() can only be read by setting it, which races with other threads; Linux exposes it.
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not possible on every platform/filesystem, hence best effort.
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_mask(path: PathLike, size: tuple[int, int], max_pixels: int | None = None) -> np.ndarray:
    """A product mask file (white = product; any format :func:`load_image` takes, EXIF orientation
    applied) -> HxW ``bool`` (True = product) for an image of ``size`` (width, height).

    Raises :class:`ImageLoadError` when it cannot be read, is not the image's size, or holds no
    product pixel (nothing above mid-grey)."""
    kw = {} if max_pixels is None else {"max_pixels": max_pixels}
    m = load_image(path, **kw)
    name = os.fspath(path)
    if m.size != tuple(size):
        raise ImageLoadError(name, f"mask is {m.size[0]}x{m.size[1]} but the image is {size[0]}x{size[1]}")
    arr = np.asarray(m.image.convert("L")) > 127
    if not arr.any():
        raise ImageLoadError(name, "mask has no white (product) pixels")
    return arr


def find_mask(mask: PathLike, image_name: str) -> Path:
    """The mask for the input ``image_name``: ``mask`` itself when it is a file, else the image
    file in the folder ``mask`` with the same stem (``scene.jpg`` -> ``DIR/scene.png``). Raises
    :class:`ImageLoadError` when there is none, or more than one."""
    p = Path(os.fspath(mask))
    if not p.is_dir():
        return p
    stem = Path(image_name).stem
    found = sorted(f for f in p.iterdir() if f.is_file() and f.stem == stem and is_image_name(f))
    if not found:
        raise ImageLoadError(str(p), f"no mask for {image_name} in this folder (looked for {stem}.<image suffix>)")
    if len(found) > 1:
        raise ImageLoadError(str(p), f"more than one mask for {image_name}: {', '.join(f.name for f in found)}")
    return found[0]
