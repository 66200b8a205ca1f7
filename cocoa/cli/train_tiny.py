"""`cocoa-train tiny-model` / `cocoa-train pretrain-tiny`: the offline tiny Qwen2-VL.

Heavy imports (torch, transformers) stay inside the command functions so `--help` is instant.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import click
from pydantic import Field

from ..config import Config, config_options
from ..tiny.pretrain import PretrainConfig  # light: pydantic only (torch is imported when training)
from .common import console


class TinyModelConfig(Config):
    """Settings of `cocoa-train tiny-model`."""

    out: str = Field("models/tiny", description="directory to write the model to (must be new or empty)")
    arch: Literal["qwen2-vl", "qwen2.5-vl"] = Field("qwen2-vl", description="architecture")
    seed: int = Field(0, description="seed of the random initialisation")
    overwrite: bool = Field(False, description="replace an existing --out directory")


@click.command("tiny-model")
@config_options(TinyModelConfig)
def tiny_model(config: TinyModelConfig) -> None:
    """Build the offline tiny Qwen2-VL (or Qwen2.5-VL) at random init.

    Writes a directory that loads like a hub checkpoint (`AutoModelForImageTextToText.from_pretrained`,
    `AutoProcessor.from_pretrained`): safetensors weights, a locally trained byte-level BPE tokenizer with
    Qwen2-VL's special tokens and <|mask|>, a Qwen2VLProcessor with small min/max pixels, and cocoa.json.
    """
    from ..progress import quiet_libraries
    from ..tiny.build import build_tiny_model

    quiet_libraries()

    from ..fs import mark_owned

    out = Path(config.out)
    _prepare_out(out, config.overwrite)
    c = console()
    with c.status(f"building the tiny {config.arch} ..."):
        build_tiny_model(out, arch=config.arch, seed=config.seed)
    mark_owned(out, "model")  # a later --overwrite may replace it
    spec = (out / "cocoa.json").read_text()
    import json

    extra = json.loads(spec)["extra"]
    c.print(f"[green]tiny {config.arch}[/green] ({extra['num_parameters']:,} parameters, seed {config.seed}) -> {out}")


def _is_legacy_model(out: Path) -> bool:
    """A model directory cocoa wrote before the ownership marker existed (cocoa.json + config.json)."""
    import json

    try:
        return (out / "config.json").is_file() and "eos_token" in json.loads((out / "cocoa.json").read_bytes())
    except (OSError, ValueError, TypeError):
        return False


def _prepare_out(out: Path, overwrite: bool) -> None:
    """An --out that is new or empty is used as is; --overwrite replaces only a model directory cocoa made
    (its marker, or a pre-marker cocoa model); anything else is refused, nothing is deleted."""
    from ..fs import has_content, mark_owned, remove_owned_tree

    if out.exists() and not out.is_dir() and not out.is_symlink():
        raise click.UsageError(f"--out {out} is a file; give a directory (cocoa never deletes a file it did not make)")
    if out.is_dir() and has_content(out):
        if not overwrite:
            raise click.UsageError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        if _is_legacy_model(out) and not out.is_symlink():
            mark_owned(out, "model")
        remove_owned_tree(out)  # refuses foreign directories, cwd, home, symlinks with a clear message


@click.command("pretrain-tiny")
@config_options(PretrainConfig)
def pretrain_tiny(config: PretrainConfig) -> None:
    """Pre-train the tiny model generatively (causal attention, next-token loss on the responses).

    Trains on PairRecords (image + question -> answer / label / caption, and image -> a detailed caption
    from the scene graph in meta["scene"]) and caches the result under $COCOA_CACHE/pretrained, keyed by the
    data's shard checksums and the settings: a second call with the same settings returns at once.
    With --out the cached model is also copied there. Loss per step: pretrain_metrics.jsonl in the model.
    """
    from ..progress import quiet_libraries
    from ..tiny.pretrain import pretrained_tiny_dir, read_metrics
    from ..model.spec import EmbeddingSpec

    quiet_libraries()

    if config.out:
        out = Path(config.out)
        _prepare_out(out, config.overwrite)
    c = console()
    settings = config.model_dump(exclude={"data", "steps", "seed", "out", "overwrite"})
    d = pretrained_tiny_dir(config.data, steps=config.steps, seed=config.seed, console=c, **settings)
    rows = read_metrics(d)
    k = min(20, len(rows))
    if rows:
        first = sum(r["loss"] for r in rows[:k]) / k
        last = sum(r["loss"] for r in rows[-k:]) / k
        c.print(f"generative pre-training: {len(rows)} steps, loss {first:.3f} (first {k}) -> {last:.3f} (last {k})")
    extra = EmbeddingSpec.load(d).extra
    al = extra.get("vision_align") or {}
    if al:
        b, a = al.get("heldout_before") or {}, al.get("heldout_after") or {}
        c.print(f"vision alignment: {al['steps']} steps, loss {al['loss_first']:.3f} -> {al['loss_last']:.3f}"
                + (f"; held-out image->caption top-1 {b['i2t_top1']:.2f} -> {a['i2t_top1']:.2f} (of {a['n']}), "
                   f"image feature cosine {b['feature_cosine']:.2f} -> {a['feature_cosine']:.2f}" if a and b else ""))
    gap = extra.get("image_gap") or {}
    if gap:  # held-out loss with the right vs. shuffled images: a ratio of 1.00 means it ignores the image
        c.print("image gap (held-out loss right -> shuffled images): " + ", ".join(
            f"{k} {v['right']:.3f} -> {v['shuffled']:.3f} (x{v['ratio']:.2f})" for k, v in gap.items()))
    c.print(f"cached model: {d}")
    if config.out:
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent)) / "model"  # ours alone
        shutil.copytree(d, tmp)
        if out.exists():
            from ..fs import remove_owned_tree

            remove_owned_tree(out)  # empty, or only cocoa's marker (checked above)
        tmp.rename(out)
        tmp.parent.rmdir()  # the empty directory mkdtemp made for the copy
        from ..fs import mark_owned

        mark_owned(out, "model")
        c.print(f"[green]copied to[/green] {out}")


COMMANDS = [tiny_model, pretrain_tiny]
