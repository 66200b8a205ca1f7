"""Drawing a scene graph with Pillow, deterministically (same scene + size -> byte-identical PNG), and
the grounding crops around one object."""

from __future__ import annotations

import functools
import io
from typing import Any

from ...records import RecordError
from .graph import Scene, SceneObject
from .vocab import COLORS, SHAPES, SIZES

SUPERSAMPLE = 2


@functools.lru_cache(maxsize=8)
def _background(size: int):  # type: ignore[no-untyped-def]
    from PIL import Image

    s = size * SUPERSAMPLE
    bg = Image.new("RGB", (1, s))
    for yy in range(s):
        t = yy / max(1, s - 1)
        bg.putpixel((0, yy), tuple(int(a + (b - a) * t) for a, b in zip((218, 220, 226), (176, 172, 166))))
    return bg.resize((s, s))


@functools.lru_cache(maxsize=8)
def _stripes(n: int):  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    step = max(4, n // 5)
    for k in range(-n, 2 * n, step):
        d.line([(k, 0), (k + n, n)], fill=255, width=max(2, step // 2))
    return m


@functools.lru_cache(maxsize=16)
def _font(px: int):  # type: ignore[no-untyped-def]
    from PIL import ImageFont

    return ImageFont.load_default(size=px)


def _shade(c: tuple[int, int, int], f: float) -> tuple[int, int, int]:
    if f >= 1:
        return tuple(int(v + (255 - v) * (f - 1)) for v in c)  # type: ignore[return-value]
    return tuple(int(v * f) for v in c)  # type: ignore[return-value]


def _silhouette(shape: str, r: float, n: int):  # type: ignore[no-untyped-def]
    """(mask, faces) for an object of radius r drawn in an n x n local patch centred at n/2."""
    import math

    from PIL import Image, ImageDraw

    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    c = n / 2
    faces: list[tuple[str, Any]] = []  # (kind, geometry) drawn lighter/darker for a 3D look
    if shape == "cube":
        f = r * 0.8
        dx = r * 0.35
        front = [c - f, c - f + dx, c + f - dx, c + f]
        top = [(c - f, c - f + dx), (c - f + dx, c - f), (c + f, c - f), (c + f - dx, c - f + dx)]
        side = [(c + f - dx, c - f + dx), (c + f, c - f), (c + f, c + f - dx), (c + f - dx, c + f)]
        d.rectangle(front, fill=255)
        d.polygon(top, fill=255)
        d.polygon(side, fill=255)
        faces = [("poly", top, 1.35), ("poly", side, 0.7)]
    elif shape == "sphere":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        faces = [("ellipse", [c - r * 0.7, c - r * 0.75, c + r * 0.25, c + r * 0.2], 1.18)]
    elif shape == "cylinder":
        w, h, e = r * 0.75, r * 0.9, r * 0.28
        d.rectangle([c - w, c - h + e, c + w, c + h - e], fill=255)
        d.ellipse([c - w, c + h - 2 * e, c + w, c + h], fill=255)
        d.ellipse([c - w, c - h, c + w, c - h + 2 * e], fill=255)
        faces = [("ellipse", [c - w, c - h, c + w, c - h + 2 * e], 1.35)]
    elif shape == "cone":
        e = r * 0.25
        d.polygon([(c, c - r), (c - r * 0.85, c + r - e), (c + r * 0.85, c + r - e)], fill=255)
        d.ellipse([c - r * 0.85, c + r - 2 * e, c + r * 0.85, c + r], fill=255)
        faces = [("poly", [(c, c - r), (c + r * 0.85, c + r - e), (c + r * 0.2, c + r - e)], 0.78)]
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((c + rad * math.cos(a), c + rad * math.sin(a) + r * 0.05))
        d.polygon(pts, fill=255)
    elif shape == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], fill=255)
        hole = r * 0.48
        d.ellipse([c - hole, c - hole, c + hole, c + hole], fill=0)
    else:
        raise RecordError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return m, faces


@functools.lru_cache(maxsize=256)
def _geometry(shape: str, size: str, S: int):  # type: ignore[no-untyped-def]
    """Everything about an object's look that depends only on its shape, size and the canvas side
    (cached: a scene's objects are then a few pastes)."""
    from PIL import Image, ImageChops, ImageDraw, ImageFilter

    r = SIZES[size] * S
    n = int(2 * r + 8)
    n += n % 2
    mask, faces = _silhouette(shape, r, n)
    shadow = Image.new("L", (n, n), 0)
    ImageDraw.Draw(shadow).ellipse([n / 2 - r * 0.9, n / 2 + r * 0.55, n / 2 + r * 0.9, n / 2 + r * 1.0], fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(max(1, r / 6)))
    stripes = ImageChops.multiply(_stripes(n), mask)
    hl = Image.new("L", (n, n), 0)
    c = n / 2
    ImageDraw.Draw(hl).ellipse([c - r * 0.55, c - r * 0.6, c - r * 0.05, c - r * 0.15], fill=235)
    hl = ImageChops.multiply(hl.filter(ImageFilter.GaussianBlur(max(1, r / 7))), mask)
    edge = ImageChops.subtract(mask, mask.filter(ImageFilter.MinFilter(3)))
    return r, n, mask, faces, shadow, stripes, hl, edge


def _draw_object(canvas, o: SceneObject, S: int) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image, ImageDraw

    r, n, mask, faces, shadow, stripes, hl, edge = _geometry(o.shape, o.size, S)
    x0, y0 = int(round(o.x * S - n / 2)), int(round(o.y * S - n / 2))
    base = COLORS[o.color]
    canvas.paste((60, 58, 56), (x0 + int(r * 0.12), y0), shadow)
    fill = _shade(base, 1.12) if o.material == "metallic" else base
    patch = Image.new("RGB", (n, n), fill)
    pd = ImageDraw.Draw(patch)
    for kind, geom, f in faces:
        col = _shade(fill, f)
        (pd.polygon if kind == "poly" else pd.ellipse)(geom, fill=col)
    if o.material == "striped":
        patch.paste(_shade(base, 0.55), (0, 0), stripes)
    elif o.material == "metallic":
        patch.paste((255, 255, 255), (0, 0), hl)
    patch.paste(_shade(base, 0.45), (0, 0), edge)  # outline: the mask's edge in a darker tone
    if o.text:
        px = int(r * 0.95)
        fg = (255, 255, 255) if sum(base) < 420 or o.material == "striped" else (20, 20, 20)
        pd.text((n / 2, n / 2 + r * 0.08), o.text, font=_font(px), fill=fg, anchor="mm",
                stroke_width=max(1, px // 10), stroke_fill=_shade(base, 0.4) if fg[0] > 128 else _shade(base, 1.5))
    canvas.paste(patch, (x0, y0), mask)


def render_scene(scene: Scene, size: int = 112):  # type: ignore[no-untyped-def]
    """Render ``scene`` to a ``size`` x ``size`` RGB PIL image (deterministic)."""
    S = size * SUPERSAMPLE
    canvas = _background(size).copy()
    for o in sorted(scene.objects, key=lambda o: (o.y, o.x)):  # back to front
        _draw_object(canvas, o, S)
    return canvas.reduce(SUPERSAMPLE)  # box-filter downsampling: anti-aliased and fast


def crop_size_for(image_size: int) -> int:
    """Side of grounding crops: half the image, a multiple of 28 (patch 14 x merge 2)."""
    return max(28, int(round(image_size / 2 / 28)) * 28)


def crop_object(image, scene: Scene, i: int, out: int | None = None):  # type: ignore[no-untyped-def]
    """A square crop around object ``i`` (its box padded by 35%, some context), resized to ``out``."""
    from PIL import Image

    W = image.size[0]
    o = scene.objects[i]
    half = o.radius * 1.35 * W
    box = [int(round(o.x * W - half)), int(round(o.y * W - half)), int(round(o.x * W + half)), int(round(o.y * W + half))]
    crop = image.crop(box)  # outside the image is filled with black, like a padded crop
    out = out or crop_size_for(W)
    return crop.resize((out, out), Image.Resampling.BICUBIC)


def png_bytes(image) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()
