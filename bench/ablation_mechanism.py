"""Is stage 2 doing its job? Direct measurements of a model before any contrastive step (bench/ablation.py).

* **Linear probe** from the frozen EOS embedding (the vector stage 3 will train) to scene attributes: object
  count, the colours present and the shapes present (multi-label, micro-F1), and the colour of the leftmost
  object (a spatial binding). Trained on the experiment's training images, scored on fresh scenes of the
  validation seed. If stage 2 compresses A into EOS, the probe should get better after it.
* **EOS-swap reconstruction:** stage 2's masked-B token accuracy with each sample's own block A, and with A
  (hence the EOS state B reads) taken from a sample with another image. The masks of B are identical in both
  passes. No drop means B is not reading A through EOS: stage 2 is not doing its job.

``python bench/ablation_mechanism.py MODEL_DIR --train-root R --mix M`` prints the measurements of one model.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLORS = ("gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow")
SHAPES = ("cube", "sphere", "cylinder", "cone")


def _image_of(rec: Any) -> Any:
    return rec.qry_image or rec.pos_image


def _pil(ref: Any, root: Path | None = None) -> Any:
    """The image of an ImageRef as cocoa's training collators read it (paths relative to ``root``, the dataset
    directory)."""
    from cocoa.model.collate import load_image

    return load_image(ref, root, "probe image").convert("RGB")


def scene_examples(records: Any, n: int, root: Path | None = None) -> list[tuple[Any, dict[str, Any]]]:
    """(PIL image, scene graph) for the first ``n`` distinct images of PairRecords carrying a scene."""
    from cocoa.records import digest

    out, seen = [], set()
    for r in records:
        ref = _image_of(r)
        scene = (r.meta or {}).get("scene")
        if ref is None or not scene or not scene.get("objects"):
            continue
        key = digest(ref.bytes) if ref.bytes is not None else ref.path
        if key in seen:
            continue
        seen.add(key)
        out.append((_pil(ref, root), scene))
        if len(out) >= n:
            break
    return out


def targets(scenes: list[dict[str, Any]]) -> dict[str, Any]:
    import torch

    colors = sorted({o["color"] for s in scenes for o in s["objects"]} | set(COLORS))
    shapes = sorted({o["shape"] for s in scenes for o in s["objects"]} | set(SHAPES))
    count = torch.tensor([len(s["objects"]) for s in scenes])
    col = torch.tensor([[float(any(o["color"] == c for o in s["objects"])) for c in colors] for s in scenes])
    shp = torch.tensor([[float(any(o["shape"] == c for o in s["objects"])) for c in shapes] for s in scenes])
    left = torch.tensor([colors.index(min(s["objects"], key=lambda o: o["x"])["color"]) for s in scenes])
    return {"count": count, "colors": col, "shapes": shp, "leftmost": left, "n_colors": len(colors)}


def _fit(x: Any, y: Any, kind: str, n_out: int, steps: int = 300, wd: float = 1e-3) -> Any:
    import torch

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], n_out)
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.Adam(lin.parameters(), lr=0.05, weight_decay=wd)
    for _ in range(steps):
        opt.zero_grad()
        out = lin(x)
        loss = (torch.nn.functional.cross_entropy(out, y) if kind == "class"
                else torch.nn.functional.binary_cross_entropy_with_logits(out, y))
        loss.backward()
        opt.step()
    return lin


def _f1(pred: Any, y: Any) -> float:
    tp = float((pred * y).sum())
    fp = float((pred * (1 - y)).sum())
    fn = float(((1 - pred) * y).sum())
    return 2 * tp / max(1e-9, 2 * tp + fp + fn)


def probe(model_dir: Path, train: list[tuple[Any, dict]], val: list[tuple[Any, dict]], batch_size: int = 32) -> dict[str, float]:
    """Linear probes from frozen (L2-normalised) embeddings of the images to scene attributes."""
    import torch

    from cocoa.model.embedder import Embedder

    emb = Embedder.from_pretrained(str(model_dir), device="cpu", dtype="float32")
    instr = "Represent the given image."

    def feats(items: list[tuple[Any, dict]]) -> Any:
        return torch.from_numpy(emb.encode(images=[i for i, _ in items], instruction=instr, batch_size=batch_size))

    xtr, xva = feats(train), feats(val)
    mu, sd = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xva = (xtr - mu) / sd, (xva - mu) / sd
    ttr = targets([s for _, s in train])
    tva = targets([s for _, s in val])
    out: dict[str, float] = {}
    kmax = int(max(ttr["count"].max(), tva["count"].max())) + 1
    lin = _fit(xtr, ttr["count"], "class", kmax)
    out["probe_count"] = float((lin(xva).argmax(-1) == tva["count"]).float().mean())
    majority = int(torch.bincount(ttr["count"]).argmax())
    out["probe_count_majority"] = float((tva["count"] == majority).float().mean())
    for key in ("colors", "shapes"):
        lin = _fit(xtr, ttr[key], "multi", ttr[key].shape[1])
        out[f"probe_{key}_f1"] = _f1((lin(xva) > 0).float(), tva[key])
    lin = _fit(xtr, ttr["leftmost"], "class", ttr["n_colors"])
    out["probe_leftmost_color"] = float((lin(xva).argmax(-1) == tva["leftmost"]).float().mean())
    out["probe_leftmost_majority"] = float((tva["leftmost"] == int(torch.bincount(ttr["leftmost"]).argmax())).float().mean())
    return out


def swap_partners(records: list[Any]) -> list[int]:
    """For each record, the index of a record with another image (deterministic: the next one, cyclically,
    half the list away or further)."""
    from cocoa.records import digest

    keys = [digest(r.image.bytes) if r.image.bytes is not None else r.image.path for r in records]
    n = len(records)
    out = []
    for i in range(n):
        for k in range(n // 2, n // 2 + n):
            j = (i + k) % n
            if keys[j] != keys[i]:
                out.append(j)
                break
        else:
            raise SystemExit("every stage-2 record has the same image: no A to swap in")
    return out


def eos_swap(model_dir: Path, records: list[Any], root: Path, b_mask_ratio: float = 0.7, variant: str = "paper",
             batch_size: int = 16, seed: int = 0) -> dict[str, float]:
    """Stage 2's masked-B accuracy and loss with each record's own A vs with another record's A."""
    import torch

    from cocoa.model.collate import Stage2Collator
    from cocoa.model.wrapper import CocoaModel

    model = CocoaModel.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()
    partners = swap_partners(records)
    swapped = [r.model_copy(update={"image": records[j].image, "prompt": records[j].prompt})
               for r, j in zip(records, partners)]
    out: dict[str, float] = {}
    for name, recs in (("own", records), ("swapped", swapped)):
        col = Stage2Collator(model.processor, model.spec, b_mask_ratio=b_mask_ratio, image_root=root, seed=seed)
        tot_acc = tot_loss = tot_n = 0.0
        with torch.no_grad():
            for i in range(0, len(recs), batch_size):
                batch = col(recs[i:i + batch_size])
                if batch is None:
                    continue
                loss, m = model.stage2_loss(batch, variant=variant)
                tot_acc += m["acc"] * m["n_masked"]
                tot_loss += float(loss) * m["n_masked"]
                tot_n += m["n_masked"]
        out[f"swap_acc_{name}"] = tot_acc / max(1.0, tot_n)
        out[f"swap_loss_{name}"] = tot_loss / max(1.0, tot_n)
    out["swap_acc_drop"] = out["swap_acc_own"] - out["swap_acc_swapped"]
    out["swap_loss_gain"] = out["swap_loss_swapped"] - out["swap_loss_own"]
    return out


def load_inputs(train_root: Path, val_seed: int, mix: Path, n_probe_train: int, n_probe_val: int, n_swap: int,
                image_size: int) -> dict[str, Any]:
    from cocoa.shards import open_dataset
    from cocoa.sources.scenes import iter_train_pairs

    train = scene_examples(open_dataset(train_root / "original"), n_probe_train, root=train_root / "original")
    val = scene_examples(iter_train_pairs(4 * n_probe_val, seed=val_seed, image_size=image_size), n_probe_val)
    recs = [r for r in open_dataset(mix, record_type="MixRecord") if r.image is not None and 2 in r.stages][:n_swap]
    return {"train": train, "val": val, "swap": recs}


def measure_all(models: dict[str, Path], *, train_root: Path, val_seed: int, mix: Path, n_probe_train: int,
                n_probe_val: int, n_swap: int, b_mask_ratio: float, seed: int, image_size: int,
                cache: Path | None = None, variant: str = "paper") -> dict[str, Any]:
    """Probe and EOS-swap measurements of every model (cached per model under ``cache``)."""
    data = load_inputs(train_root, val_seed, mix, n_probe_train, n_probe_val, n_swap, image_size)
    res: dict[str, Any] = {}
    for name, d in models.items():
        f = cache / (name.replace(" ", "_").replace(",", "") + ".json") if cache else None
        if f is not None and f.is_file():
            res[name] = json.loads(f.read_text())
            continue
        m = probe(d, data["train"], data["val"])
        m.update(eos_swap(d, data["swap"], mix, b_mask_ratio, variant=variant, seed=seed))
        res[name] = m
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text(json.dumps(m, indent=2))
    return {"measures": res, "n": {"probe_train": len(data["train"]), "probe_val": len(data["val"]),
                                   "swap_records": len(data["swap"])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path, nargs="+")
    p.add_argument("--train-root", type=Path, required=True, help="a scenes build (its original/ pairs)")
    p.add_argument("--mix", type=Path, required=True, help="a mix/ dataset (stage-2 records)")
    p.add_argument("--val-seed", type=int, default=101)
    p.add_argument("--n-probe-train", type=int, default=1000)
    p.add_argument("--n-probe-val", type=int, default=500)
    p.add_argument("--n-swap", type=int, default=192)
    p.add_argument("--variant", default="paper", choices=("paper", "strict"))
    a = p.parse_args()
    r = measure_all({str(m): m for m in a.model}, train_root=a.train_root, val_seed=a.val_seed, mix=a.mix,
                    n_probe_train=a.n_probe_train, n_probe_val=a.n_probe_val, n_swap=a.n_swap, b_mask_ratio=0.7,
                    seed=0, image_size=112, variant=a.variant)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
