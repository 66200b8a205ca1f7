"""MMEB images: read by relative path from the zips (in place) or an extracted directory, checked
(path safety, size guard, full decode) and kept as they are or re-encoded to RGB PNG."""

from __future__ import annotations

import io
import lzma
import warnings
import zipfile
import zlib
from pathlib import Path

from ...errors import CocoaError
from ...records import MAX_IMAGE_PIXELS, ImageRef, _check_relpath, decode_image
from .layout import MMEBError
from .report import _Skip


def _candidates(path: str) -> list[str]:
    """Spellings of an MMEB image path to try: as written, without / with a leading ``images/``."""
    out = [path]
    if path.startswith("images/"):
        out.append(path[len("images/"):])
    else:
        out.append("images/" + path)
    return out


def image_bytes_checked(data: bytes, name: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[bytes, bool]:
    """Validate image bytes (fully decoded; size guard before decoding) and return ``(bytes, converted)``:
    RGB JPEG/PNG are kept as they are; other modes (CMYK, RGBA, LA, L, P, I;16) or formats are
    converted to RGB and re-encoded as PNG. Raises :class:`_Skip` with the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                mode, fmt = im.mode, im.format
    except Image.DecompressionBombError as e:
        raise _Skip("image_too_large", f"image {name}: {e} (decompression-bomb guard)") from None
    except Exception as e:
        raise _Skip("corrupt_image", f"image {name} cannot be opened ({type(e).__name__}: {e}); it is corrupt or not an image") from None
    if w * h > max_pixels:
        raise _Skip("image_too_large", f"image {name} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels} "
                                       "(decompression-bomb guard); downscale it or raise max_pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            rgb = decode_image(data, name=name, max_pixels=max_pixels)
    except CocoaError as e:
        raise _Skip("corrupt_image", str(e)) from None
    if mode == "RGB" and fmt in ("JPEG", "PNG"):
        return data, False
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue(), True


class ImageSource:
    """Reads MMEB images by their relative path from zips (in place) and/or extracted directories."""

    def __init__(self, zips: list[Path] | None = None, dirs: list[Path] | None = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.zips = [Path(z) for z in zips or []]
        self.dirs = [Path(d) for d in dirs or []]
        self.max_pixels = max_pixels
        self._open: dict[Path, tuple[zipfile.ZipFile, set[str]]] = {}

    def _zip(self, z: Path) -> tuple[zipfile.ZipFile, set[str]]:
        if z not in self._open:
            try:
                zf = zipfile.ZipFile(z)
            except zipfile.BadZipFile as e:
                raise MMEBError(f"{z} is not a readable zip ({e}); download it again") from None
            self._open[z] = (zf, set(zf.namelist()))
        return self._open[z]

    def close(self) -> None:
        for zf, _ in self._open.values():
            zf.close()
        self._open.clear()

    def describe(self) -> str:
        parts = [str(z) for z in self.zips] + [f"{d}/" for d in self.dirs]
        return ", ".join(parts) or "(no image zip or directory)"

    def read(self, path: str) -> bytes:
        """Raw bytes of the image at MMEB relative ``path``; raises :class:`_Skip` if unusable."""
        if "\x00" in path:
            raise _Skip("unsafe_path", f"image path {path!r} contains a NUL byte")
        try:
            norm = _check_relpath(path)
        except ValueError as e:
            raise _Skip("unsafe_path", f"{e}; refusing to read it") from None
        if "/../" in f"/{path.replace(chr(92), '/')}/":
            raise _Skip("unsafe_path", f"image path {path!r} contains '..'; refusing to read it")
        names = _candidates(norm)
        for z in self.zips:
            zf, members = self._zip(z)
            for n in names:
                if n in members:
                    info = zf.getinfo(n)
                    if info.file_size > 4 * self.max_pixels + (64 << 20):
                        raise _Skip("image_too_large", f"zip member {z.name}:{n} is {info.file_size} bytes uncompressed")
                    try:
                        return zf.read(n)
                    # a damaged member raises many types: BadZipFile (CRC), zlib.error / lzma.LZMAError / EOFError
                    # (bad compressed data), RuntimeError (encrypted), NotImplementedError (unknown method)
                    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError, ValueError,
                            zlib.error, lzma.LZMAError) as e:
                        raise _Skip("corrupt_image", f"zip member {z.name}:{n} cannot be read "
                                                     f"({type(e).__name__}: {e})") from None
        for d in self.dirs:
            for n in names:
                try:
                    f = ImageRef(path=n).resolve(d)
                except (CocoaError, ValueError) as e:
                    raise _Skip("unsafe_path", str(e)) from None
                if f.is_file():
                    return f.read_bytes()
        raise _Skip("missing_image", f"image {path!r} is not in {self.describe()} (tried {', '.join(names)})")

    def image(self, path: str) -> tuple[ImageRef, bool]:
        data, converted = image_bytes_checked(self.read(path), path, self.max_pixels)
        return ImageRef(bytes=data, path=_check_relpath(path)), converted
