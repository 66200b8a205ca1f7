"""A contact sheet: a labelled grid of training pairs and evaluation queries with their candidates,
to look at what the benchmark asks."""

from __future__ import annotations

from pathlib import Path

from .evalsets import iter_eval_sets
from .render import _font, png_bytes
from .tasks import iter_train_pairs
from .vocab import IMG

def contact_sheet(seed: int = 0, n: int = 24, image_size: int = 112, cols: int = 6):  # type: ignore[no-untyped-def]
    """A labelled grid as a PIL image: the first ``n`` training pairs (rendered scene x2, task and
    coarse text; grounding shows its crop in the corner), then one query from three evaluation sets
    with its first candidates (positive framed green, hard negatives red)."""
    from PIL import Image, ImageDraw

    Z = 2  # upscale factor for legibility
    pad, text_h = 4, 46
    tw, th = image_size * Z + 2 * pad, image_size * Z + text_h + 2 * pad
    rows = (n + cols - 1) // cols
    eval_h = 3 * (th + 20)
    sheet = Image.new("RGB", (cols * tw, rows * th + eval_h), (255, 255, 255))
    d = ImageDraw.Draw(sheet)
    font = _font(12)

    def tile(img, x: int, y: int, frame: tuple[int, int, int] | None = None) -> None:  # type: ignore[no-untyped-def]
        big = img.resize((image_size * Z, image_size * Z), Image.Resampling.NEAREST)  # crops are upscaled more
        sheet.paste(big, (x + pad, y + pad))
        if frame:
            d.rectangle([x + pad - 2, y + pad - 2, x + pad + image_size * Z + 1, y + pad + image_size * Z + 1],
                        outline=frame, width=3)

    def caption(x: int, y: int, first: str, second: str) -> None:
        d.text((x + pad, y + pad + image_size * Z + 2), first[:38], fill=(90, 90, 90), font=font)
        d.text((x + pad, y + pad + image_size * Z + 17), second[:38], fill=(0, 0, 0), font=font)
        d.text((x + pad, y + pad + image_size * Z + 31), second[38:76], fill=(0, 0, 0), font=font)

    for k, rec in enumerate(iter_train_pairs(n, seed, image_size=image_size)):
        x, y = (k % cols) * tw, (k // cols) * th
        tile((rec.qry_image or rec.pos_image).load(), x, y)  # type: ignore[union-attr]
        task = rec.meta["task"]
        if task == "grounding" and rec.pos_image is not None:
            crop = rec.pos_image.load()
            sheet.paste(crop, (x + pad + image_size * Z - crop.size[0], y + pad + image_size * Z - crop.size[1]))
        if task == "vqa":
            text = rec.qry_text.split("question: ")[-1] + " -> " + rec.pos_text
        elif task in ("retrieval_t2i", "grounding"):
            text = rec.qry_text.split(": ")[-1]
        else:
            text = rec.pos_text
        caption(x, y, f"train {task} {rec.meta.get('qtype', '')}", text)

    y0 = rows * th
    for r, name in enumerate(("SceneT2I-OOD", "SceneGround", "SceneVQA-OOD")):
        rec = next(iter_eval_sets(1, cols - 1, seed, image_size=image_size, datasets=[name]))
        y = y0 + r * (th + 20)
        query = rec.qry_text.split(": ", 1)[-1].replace(IMG, "").strip()
        d.text((pad, y + 2), f"eval {name}: {query}"[:150], fill=(0, 0, 120), font=font)
        y += 18
        if name == "SceneVQA-OOD":
            tile(rec.qry_image.load(), 0, y)  # type: ignore[union-attr]
            for j, t in enumerate(rec.tgt_texts[: cols - 1]):
                d.text((tw + pad, y + pad + 20 * j), ("+ " if j == 0 else "- ") + t,
                       fill=(0, 130, 0) if j == 0 else (170, 0, 0), font=font)
            continue
        for j, ref in enumerate(rec.tgt_images[:cols]):
            tile(ref.load(), j * tw, y, (0, 170, 0) if j == 0 else (200, 40, 40))  # type: ignore[union-attr]
            if name == "SceneGround" and j == 0 and rec.qry_image is not None:
                q = rec.qry_image.load().resize((image_size // 2 * Z, image_size // 2 * Z))
                sheet.paste(q, (tw - pad - q.size[0], y + th - text_h - q.size[1]))
        d.text((pad, y + pad + image_size * Z + 4), "green = positive (candidate 0), red = distractors, hard ones first",
               fill=(90, 90, 90), font=font)
    return sheet


def write_contact_sheet(path: str | Path, seed: int = 0, n: int = 24, image_size: int = 112) -> Path:
    from ...shards import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(contact_sheet(seed, n, image_size)))
    return path
