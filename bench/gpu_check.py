"""The one prepared GPU check: every open GPU question of cocoa's training in one run of <= 9 minutes on one
H100/H200 (torch 2.11, transformers 5.17, no vLLM / flash_attn / polars / datasets). Run it through
``bench/gpu_check.sh``; ``--cpu`` runs the same sections at toy sizes (tested in ``make test``).

Sections (each in its own process, with its own time limit; a failure is recorded and the next one runs; the
report is rewritten after every section, so a killed run still leaves what it measured):

1. ``env``          versions, device, memory, measured bf16 matmul peak, which optional packages exist
2. ``train_bench``  stock transformers step (causal LM loss, HF's own forward) vs cocoa's stage 1 / 2 / 3 steps on a
                    random-init Qwen2-VL-2B (bench/train_bench.py; full fine-tuning, batch 16, 448 px, gradient
                    checkpointing): ms/step, samples/s, % of bf16 peak (measured and nominal), peak memory; then the
                    stage-3 step with DoRA (dropout 0.05 and 0) and LoRA adapters on a bf16 base
3. ``attention``    dense SDPA vs FlexAttention for the stage-2 collaborative mask at 1k / 2k / 4k tokens
                    (bench/attention_bench.py part 1), with FlexAttention's error against fp32
4. ``precision``    bf16-vs-fp32 agreement of the stage 1 / 2 / 3 losses and gradient norms on fixed batches
                    (fp32; bf16 autocast on fp32 weights; bf16 weights + autocast as the DoRA recipe runs)
5. ``fsdp``         ``torchrun --nproc_per_node 1 -m cocoa.cli.train --strategy fsdp --lora-method full`` for 2 steps
                    of each stage (real widths, 2 LLM layers / 2 ViT blocks), sharded checkpoints, reload
6. ``real_dims_2b`` bench/real_dims.py: the paper recipe (DoRA on LLM + ViT, GradCache, 448 / 672 px) on a
                    random-init Qwen2-VL-2B at full depth, 3 steps per stage, merge, reload, Embedder
7. ``real_dims_3b`` the same for Qwen2.5-VL-3B (only when the time left allows it)

Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (+ ``OUT/logs/SECTION.log``). Importable without polars /
datasets / vllm (and never imports them).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

FORBIDDEN = ("polars", "datasets", "vllm", "flash_attn")
NEEDED = ("torch", "transformers", "peft", "pydantic", "rich", "click", "yaml", "PIL", "safetensors", "pyarrow",
          "torchvision", "tokenizers", "numpy")
NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s (SXM)
SECTIONS = ("env", "train_bench", "attention", "precision", "fsdp", "real_dims_2b", "real_dims_3b")
# GPU: (time limit s, least time left to start it); CPU (--cpu): toy sizes, one limit for all
GPU_LIMITS = {"env": (60, 20), "train_bench": (150, 60), "attention": (120, 40), "precision": (90, 40),
              "fsdp": (150, 60), "real_dims_2b": (240, 150), "real_dims_3b": (240, 200)}
CPU_LIMIT = 240


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def _device(cpu: bool) -> Any:
    import torch

    if cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device; run bench/gpu_check.sh --cpu for the toy-size code-path check")
    return torch.device("cuda")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: Any) -> float | None:
    import torch

    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return None


def _reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _nominal_peak(device: Any) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


def _work_dir(name: str) -> Path:
    """A fresh scratch directory for a section's models and data, OUTSIDE the report directory (whatever lands in
    $OUT is copied back; models are gigabytes): $GPU_CHECK_WORK or the system temporary directory."""
    import tempfile

    root = os.environ.get("GPU_CHECK_WORK") or None
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"cocoa-gpu-check-{name}-", dir=root))


def forbidden_imported() -> list[str]:
    return sorted(m for m in FORBIDDEN if m in sys.modules)


# ---------------------------------------------------------------------------------------------------
# sections (each returns a JSON-able dict; "ok": False marks a failed check)
# ---------------------------------------------------------------------------------------------------
def section_env(a: argparse.Namespace) -> dict[str, Any]:
    import platform

    import torch
    import transformers

    import train_bench as tb

    device = _device(a.cpu)
    res: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "transformers": transformers.__version__, "cuda": torch.version.cuda,
                           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                           "cpus": os.cpu_count()}
    for mod in ("peft", "accelerate", "pydantic", "torchvision", "pyarrow"):
        try:
            res[mod] = __import__(mod).__version__
        except Exception as e:  # report, do not fail here: the sections that need it will
            res[mod] = f"missing ({type(e).__name__})"
    res["missing"] = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    res["optional_present"] = {m: importlib.util.find_spec(m) is not None for m in FORBIDDEN}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        res.update(gpu_memory_gib=round(p.total_memory / 2**30, 1), sm=f"{p.major}.{p.minor}",
                   bf16_supported=torch.cuda.is_bf16_supported())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    res["matmul_peak_tflops"] = round(tb.measured_peak_flops(device, dtype) / 1e12, 3)
    nominal = _nominal_peak(device)
    res["nominal_bf16_tflops"] = nominal / 1e12 if nominal else None
    res["ok"] = not res["missing"]
    return res


def _stock_step_bench(model: Any, batch: dict[str, Any], steps: int, warmup: int, device: Any, amp: Any
                      ) -> dict[str, Any]:
    """The stock transformers step: HF's own forward with ``labels`` (causal LM loss over every text token, its
    causal mask, its position ids), AdamW, clipping -- the baseline a user would write."""
    import torch

    from cocoa.model.collate import batch_to
    from cocoa.model.wrapper import call_filtered

    import train_bench as tb

    hf = model.model
    b = batch_to(batch, device)
    labels = b["input_ids"].clone()
    labels[b["attention_mask"] == 0] = -100
    labels[b["input_ids"] == model.image_token_id] = -100
    kw = dict(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=labels, use_cache=False,
              pixel_values=b["pixel_values"].to(model.dtype), image_grid_thw=b["image_grid_thw"],
              mm_token_type_ids=b.get("mm_token_type_ids"))
    params = [p for p in hf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, foreach=True)

    def step() -> float:
        with amp:
            out = call_filtered(hf.forward, **kw)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    for _ in range(warmup):
        step()
    _sync(device)
    _reset_peak(device)
    t = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    dt = (time.perf_counter() - t) / max(steps, 1)
    nolab = {k: v for k, v in b.items() if k != "labels"}
    flops, real, slots = tb.batch_flops(model, nolab, 2)
    cfg = model.hf_config.text_config
    flops += 6 * cfg.hidden_size * cfg.vocab_size * real  # HF's LM head runs at every position
    del opt
    return {"stage": "stock", "step_s": dt, "tokens": real, "tokens_per_s": real / dt, "flops": flops,
            "padding_share": 1 - real / slots if slots else 0.0, "peak_mem_gib": _peak_gib(device), "loss": loss}


def section_train_bench(a: argparse.Namespace) -> dict[str, Any]:
    from contextlib import nullcontext

    import torch

    import train_bench as tb

    device = _device(a.cpu)
    size = "tiny" if a.cpu else "2b"
    s = tb.SIZES[size]
    batch, image = s["batch"], s["image"]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    steps, warmup = (1, 0) if a.cpu else (3, 1)
    peak = tb.measured_peak_flops(device, dtype)
    nominal = _nominal_peak(device)
    model = tb.build_model(size, device, dtype, image)
    grad_ckpt = device.type == "cuda"
    if grad_ckpt:
        model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rows = []
    data2 = tb.synthetic_batches(model, 2, batch, image, s["query_words"], s["text_words"], batch, seed=2)
    rows.append(_stock_step_bench(model, data2, steps, warmup, device, amp))
    for k in (1, 2, 3):
        if k == 1:
            model.ensure_image_decoder()
        data = data2 if k == 2 else tb.synthetic_batches(model, k, batch, image, s["query_words"], s["text_words"],
                                                         batch, seed=k)
        _reset_peak(device)
        rows.append(tb.bench_stage(model, k, data, steps, warmup, device, amp, grad_ckpt))
    # the paper recipe's adapters on the same stage-3 step: DoRA (dropout 0.05: peft then recomputes every adapted
    # base projection), DoRA without dropout, LoRA -- bf16 base, fp32 adapters, as cocoa-train runs them
    from cocoa.train.config import LoraSection
    from cocoa.train.lora import apply_adapters

    for label, method, dropout in (("DoRA", "dora", 0.05), ("DoRA, dropout 0", "dora", 0.0), ("LoRA", "lora", 0.05)):
        peft_model = apply_adapters(model.model, LoraSection(method=method, dropout=dropout))
        if grad_ckpt:
            model.model.enable_input_require_grads()
        for p in model.model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        _reset_peak(device)
        r = tb.bench_stage(model, 3, data, steps, warmup, device, amp, grad_ckpt)
        r["stage"] = f"3 {label}"
        rows.append(r)
        peft_model.unload()
    for r in rows:
        r["samples_per_s"] = batch / r["step_s"]
        r["mfu_measured_peak"] = r["flops"] / r["step_s"] / peak
        r["mfu_nominal_peak"] = r["flops"] / r["step_s"] / nominal if nominal else None
        r["finite"] = math.isfinite(r["loss"])
    by = {r["stage"]: r for r in rows}
    return {"size": size, "batch": batch, "image": image, "grad_ckpt": grad_ckpt, "steps": steps, "warmup": warmup,
            "params_m": round(sum(p.numel() for p in model.model.parameters()) / 1e6, 1),
            "peak_tflops_measured": peak / 1e12, "peak_tflops_nominal": nominal / 1e12 if nominal else None,
            "rows": rows, "cocoa_stage3_vs_stock": by[3]["step_s"] / by["stock"]["step_s"],
            "ok": all(r["finite"] for r in rows)}


def section_attention(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    import attention_bench as ab

    device = _device(a.cpu)
    size = dict(ab.SIZES["tiny" if a.cpu else "2b"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    steps, warmup = (1, 0) if a.cpu else (5, 2)
    rows = ab.attention_bench(size, device, dtype, steps, warmup)
    for r in rows:
        r["dense_over_causal"] = r["dense"] / r["causal"]
        r["flex_over_dense"] = r["flex"] / r["dense"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    return {"lengths": [r["L"] for r in rows], "batch": size["attn_batch"], "heads": size["heads"],
            "kv_heads": size["kv"], "dtype": str(dtype), "rows": rows, "tolerance": tol,
            "ok": all(r["flex_rel_err"] < tol for r in rows)}


def section_precision(a: argparse.Namespace) -> dict[str, Any]:
    """Stage losses and gradient norms of one fixed batch per stage: fp32 vs bf16 autocast (fp32 weights) vs
    bf16 weights + autocast."""
    import torch

    import train_bench as tb

    device = _device(a.cpu)
    size = "tiny" if a.cpu else "2b"
    s = tb.SIZES[size]
    batch = 4
    model = tb.build_model(size, device, torch.float32, s["image"])
    model.ensure_image_decoder()
    model.train()
    from cocoa.model.collate import batch_to
    from cocoa.model.objectives import info_nce

    data = {k: tb.synthetic_batches(model, k, batch, s["image"], s["query_words"], s["text_words"], batch, seed=10 + k)
            for k in (1, 2, 3)}
    data = {k: ([[batch_to(b, device) for b in g] for g in v] if k == 3 else batch_to(v, device))
            for k, v in data.items()}

    def loss_of(k: int) -> Any:
        if k == 1:
            return model.stage1_loss(data[1])[0]
        if k == 2:
            return model.stage2_loss(data[2])[0]
        (q,), (t,) = data[3]
        return info_nce(model.embed(q).float(), model.embed(t).float(), 0.02, gather=False)[0]

    def measure(autocast: bool) -> dict[int, dict[str, float]]:
        out = {}
        for k in (1, 2, 3):
            model.zero_grad(set_to_none=True)
            ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else torch.autocast(device.type, enabled=False)
            with ctx:
                loss = loss_of(k)
            loss.backward()
            g = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in model.parameters() if p.grad is not None))
            out[k] = {"loss": float(loss.detach()), "grad_norm": float(g)}
        model.zero_grad(set_to_none=True)
        return out

    ref = measure(False)
    amp32 = measure(True)
    model.to(torch.bfloat16)
    amp16 = measure(True)
    rows = []
    for k in (1, 2, 3):
        r = {"stage": k, "fp32_loss": ref[k]["loss"], "fp32_grad_norm": ref[k]["grad_norm"]}
        for name, m in (("autocast", amp32), ("bf16_weights", amp16)):
            r[f"{name}_loss"] = m[k]["loss"]
            r[f"{name}_loss_rel_diff"] = abs(m[k]["loss"] - ref[k]["loss"]) / max(abs(ref[k]["loss"]), 1e-12)
            r[f"{name}_grad_norm_ratio"] = m[k]["grad_norm"] / max(ref[k]["grad_norm"], 1e-30)
        rows.append(r)
    tol = 0.02
    ok = all(math.isfinite(r[key]) for r in rows for key in r) and all(
        r["autocast_loss_rel_diff"] < tol and r["bf16_weights_loss_rel_diff"] < tol for r in rows)
    return {"size": size, "batch": batch, "tolerance_rel": tol, "rows": rows, "ok": ok}


def _real_dims_args(a: argparse.Namespace, extra: list[str]) -> Any:
    import real_dims as rd

    base = ["--toy", "--side12", "56", "--side3", "84", "--steps", "2"] if a.cpu else []
    return rd.parse_args(base + extra)


def section_fsdp(a: argparse.Namespace) -> dict[str, Any]:
    """cocoa-train under torchrun with one process, FSDP2, full fine-tuning: 2 steps of each stage (1 with --cpu)."""
    import shutil

    work = _work_dir("fsdp")
    try:
        return _fsdp(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fsdp(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    import real_dims as rd

    ra = _real_dims_args(a, [] if a.cpu else ["--text-layers", "2", "--vision-depth", "2"])
    base = rd.build_model_dir("qwen2-vl-2b", work / "base", dtype="bf16", text_layers=ra.text_layers,
                              vision_depth=ra.vision_depth, toy=ra.toy, device="cpu" if a.cpu else "cuda")
    data = rd.make_workspace(work / "shards", rows12=4, rows3=4, side12=ra.side12, side3=ra.side3)
    px12, px3 = ra.side12**2, ra.side3**2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "cocoa.cli.train", "--model", base["dir"], "--data", str(data), "--out", str(work / "run"),
           "--stages", "1,2,3", "--preset", "paper", "--lora-method", "full", "--strategy", "fsdp",
           "--gradient-checkpointing", "--no-progress"]
    for k in (1, 2, 3):
        px = px3 if k == 3 else px12
        cmd += [f"--stage{k}-steps", "1" if a.cpu else "2", f"--stage{k}-batch-size", "4", f"--stage{k}-micro-batch-size", "2",
                f"--stage{k}-image-min-pixels", str(px), f"--stage{k}-image-max-pixels", str(px)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    tail = (proc.stdout + proc.stderr)[-3000:]
    res: dict[str, Any] = {"command": " ".join(["torchrun"] + cmd[3:]).replace(str(work), "WORK"),
                           "exit": proc.returncode, "seconds": round(seconds, 1), "params": base["params"],
                           "text_layers": base["text_layers"], "vision_depth": base["vision_depth"]}
    if proc.returncode != 0:
        res.update(ok=False, error=" ".join(tail.split())[-1500:])
        return res
    from cocoa.train.metrics import read_metrics

    run = work / "run"
    losses = {k: [r["loss"] for r in read_metrics(run, k)] for k in (1, 2, 3)}
    sharded = {k: sorted(p.name for p in (run / f"stage{k}" / "checkpoints").glob("*/optimizer-rank*.pt"))
               for k in (1, 2, 3)}
    from transformers import AutoModelForImageTextToText

    m = AutoModelForImageTextToText.from_pretrained(run / "stage3" / "model")
    n = sum(p.numel() for p in m.parameters())
    del m
    res.update(losses=losses, sharded_optimizer_files=sharded, reloaded_params=n,
               ok=all(v and all(math.isfinite(x) for x in v) for v in losses.values())
               and all(sharded.values()) and n == base["params"])
    return res


def _section_real_dims(a: argparse.Namespace, name: str) -> dict[str, Any]:
    import real_dims as rd

    import shutil

    work = _work_dir(name)
    extra = ["--models", name] + ([] if a.cpu else ["--batch12", "4", "--batch3", "8", "--micro", "2"])
    ra = _real_dims_args(a, extra)
    try:
        res = rd.run_one(name, ra, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.devnull, "w") as null:
        res["text"] = rd.report(res, out=null)
    res["failures"] = rd.check(res)
    res["ok"] = not res["failures"]
    return res


def section_real_dims_2b(a: argparse.Namespace) -> dict[str, Any]:
    return _section_real_dims(a, "qwen2-vl-2b")


def section_real_dims_3b(a: argparse.Namespace) -> dict[str, Any]:
    return _section_real_dims(a, "qwen2.5-vl-3b")


FUNCS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "env": section_env, "train_bench": section_train_bench, "attention": section_attention,
    "precision": section_precision, "fsdp": section_fsdp, "real_dims_2b": section_real_dims_2b,
    "real_dims_3b": section_real_dims_3b,
}


def section_result(a: argparse.Namespace, name: str) -> dict[str, Any]:
    """Run section ``name`` here; its result with status ok / fail / error, also written to OUT/sections/NAME.json."""
    import torch

    if a.cpu:
        torch.set_num_threads(int(os.environ.get("COCOA_GPU_CHECK_THREADS", "1")))
    out = Path(a.out) / "sections"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    try:
        res = FUNCS[name](a)
        status = "ok" if res.get("ok", True) else "fail"
    except Exception as e:
        res = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:1500]}",
               "traceback": traceback.format_exc()[-4000:]}
        status = "error"
    res.update(status=status, seconds=round(time.perf_counter() - t, 1), forbidden_imported=forbidden_imported())
    if res["forbidden_imported"]:
        res["status"] = "fail"
        res["error"] = f"imported {res['forbidden_imported']} (the GPU image has none of them)"
    (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    return res


def run_section(a: argparse.Namespace) -> int:
    """Child process: run one section, write OUT/sections/NAME.json."""
    return 0 if section_result(a, a.section)["status"] == "ok" else 1


# ---------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".1f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, fmt)


def markdown(report: dict[str, Any]) -> str:
    L: list[str] = []
    p = L.append
    p(f"# cocoa GPU check ({report['mode']})")
    p("")
    p(f"Started {report['started']}, {report.get('seconds', 0):.0f} s of a {report['budget_s']} s budget. "
      f"Command: `{report['command']}`.")
    p("")
    p("| section | status | seconds | note |")
    p("|---|---|---:|---|")
    for name in report["order"]:
        s = report["sections"].get(name, {})
        note = s.get("reason") or s.get("error", "")
        p(f"| {name} | {s.get('status', 'not run')} | {_f(s.get('seconds'))} | {' '.join(str(note).split())[:160]} |")
    sec = report["sections"]
    env = sec.get("env", {})
    if env.get("status") == "ok" or "torch" in env:
        p("")
        p(f"**Environment**: {env.get('device')} ({env.get('gpu_memory_gib', '-')} GiB), Python {env.get('python')}, "
          f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, CUDA "
          f"{env.get('cuda')}; matmul peak measured {env.get('matmul_peak_tflops')} TFLOP/s (nominal bf16 "
          f"{env.get('nominal_bf16_tflops') or '-'}); missing: {env.get('missing') or 'none'}; optional present: "
          f"{env.get('optional_present')}")
    tb = sec.get("train_bench", {})
    if tb.get("rows"):
        p("")
        p(f"**Training step** ({tb['size']}, {tb['params_m']} M params, batch {tb['batch']}, {tb['image']} px, gradient "
          f"checkpointing {tb['grad_ckpt']}, {tb['steps']} timed steps):")
        p("")
        p("| step | ms | samples/s | tokens/s | % of measured peak | % of nominal bf16 | peak GiB | loss |")
        p("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in tb["rows"]:
            name = ("stock HF (causal LM loss)" if r["stage"] == "stock" else f"cocoa stage {r['stage']}"
                    + (" (full fine-tuning)" if isinstance(r["stage"], int) else ""))
            p(f"| {name} | {r['step_s'] * 1e3:.0f} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['mfu_measured_peak']:.1%} | {_f(r['mfu_nominal_peak'] * 100 if r['mfu_nominal_peak'] else None)}"
              f"{'%' if r['mfu_nominal_peak'] else ''} | {_f(r['peak_mem_gib'])} | {r['loss']:.3f} |")
    at = sec.get("attention", {})
    if at.get("rows"):
        p("")
        p(f"**Attention** (stage-2 collaborative mask, {at['heads']} q / {at['kv_heads']} kv heads, batch {at['batch']}, "
          f"{at['dtype']}, {at['rows'][0]['mode']}, median ms):")
        p("")
        p("| L | causal SDPA | dense mask SDPA | FlexAttention | dense/causal | flex/dense | flex rel. err |")
        p("|---:|---:|---:|---:|---:|---:|---:|")
        for r in at["rows"]:
            p(f"| {r['L']} | {r['causal']:.2f} | {r['dense']:.2f} | {r['flex']:.2f} | {r['dense_over_causal']:.2f} | "
              f"{r['flex_over_dense']:.2f} | {r['flex_rel_err']:.1e} |")
    pr = sec.get("precision", {})
    if pr.get("rows"):
        p("")
        p(f"**bf16 vs fp32** ({pr['size']}, batch {pr['batch']}; relative loss difference, gradient-norm ratio):")
        p("")
        p("| stage | fp32 loss | autocast rel. diff | autocast grad ratio | bf16 weights rel. diff | bf16 weights grad ratio |")
        p("|---:|---:|---:|---:|---:|---:|")
        for r in pr["rows"]:
            p(f"| {r['stage']} | {r['fp32_loss']:.4f} | {r['autocast_loss_rel_diff']:.1e} | "
              f"{r['autocast_grad_norm_ratio']:.3f} | {r['bf16_weights_loss_rel_diff']:.1e} | "
              f"{r['bf16_weights_grad_norm_ratio']:.3f} |")
    fs = sec.get("fsdp", {})
    if "exit" in fs:
        p("")
        p(f"**FSDP2, one process** ({fs.get('params', 0) / 1e6:.0f} M params, {fs.get('text_layers')} LLM layers, "
          f"{fs.get('vision_depth')} ViT blocks, full fine-tuning): exit {fs['exit']} in {fs['seconds']} s; losses "
          f"{fs.get('losses')}; sharded optimizer files {fs.get('sharded_optimizer_files')}; reloaded "
          f"{fs.get('reloaded_params')} params. `{fs['command']}`")
    for name in ("real_dims_2b", "real_dims_3b"):
        rd = sec.get(name, {})
        if rd.get("text"):
            p("")
            p(f"**{name}** ({'PASS' if rd.get('ok') else 'FAIL: ' + str(rd.get('failures'))}):")
            p("")
            p("```")
            p(rd["text"])
            p("```")
    return "\n".join(L) + "\n"


def write_report(out: Path, report: dict[str, Any]) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))


def orchestrate(a: argparse.Namespace) -> int:
    out = Path(a.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    order = [s.strip() for s in a.sections.split(",") if s.strip()]
    unknown = [s for s in order if s not in FUNCS]
    if unknown:
        raise SystemExit(f"gpu_check: unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    t0 = time.time()
    deadline = t0 + a.budget
    report: dict[str, Any] = {"mode": "cpu (toy sizes)" if a.cpu else "gpu", "budget_s": a.budget, "order": order,
                              "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t0)),
                              "command": "bench/gpu_check.sh" + (" --cpu" if a.cpu else ""), "sections": {}}
    write_report(out, report)
    for name in order:
        left = deadline - time.time()
        limit, least = (CPU_LIMIT, 0) if a.cpu else GPU_LIMITS[name]
        if left < max(least, 5):
            report["sections"][name] = {"status": "skipped", "reason": f"{left:.0f} s left of the budget"}
            write_report(out, report)
            continue
        print(f"gpu_check: {name} (limit {min(limit, left):.0f} s) ...", flush=True)
        if not a.isolate:  # --cpu --no-isolate: in this process (imports once)
            res = section_result(a, name)
            report["sections"][name] = res
            report["seconds"] = round(time.time() - t0, 1)
            write_report(out, report)
            print(f"gpu_check: {name}: {res.get('status')} in {res.get('seconds')} s"
                  + (f" ({res.get('error', '')[:300]})" if res.get("status") != "ok" else ""), flush=True)
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out)] + (["--cpu"] if a.cpu else [])
        log = out / "logs" / f"{name}.log"
        t = time.time()
        with open(log, "w") as f:
            try:
                proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=min(limit, left))
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = None
        res_file = out / "sections" / f"{name}.json"
        if res_file.is_file():
            res = json.loads(res_file.read_text())
        else:
            tail = " ".join(log.read_text(errors="replace")[-1500:].split()) if log.is_file() else ""
            why = f"timed out after {time.time() - t:.0f} s" if code is None else f"exit {code}"
            res = {"status": "error", "error": f"{why}: {tail}", "seconds": round(time.time() - t, 1)}
        report["sections"][name] = res
        report["seconds"] = round(time.time() - t0, 1)
        write_report(out, report)
        print(f"gpu_check: {name}: {res.get('status')} in {res.get('seconds')} s"
              + (f" ({res.get('error', '')[:300]})" if res.get("status") != "ok" else ""), flush=True)
    report["seconds"] = round(time.time() - t0, 1)
    ok = all(report["sections"].get(n, {}).get("status") in ("ok", "skipped") for n in order)
    report["ok"] = ok
    write_report(out, report)
    print(f"gpu_check: {'PASS' if ok else 'FAIL'} in {report['seconds']:.0f} s -> {out / 'gpu_check.md'}", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_check_out", help="report directory (default $OUT)")
    ap.add_argument("--cpu", action="store_true", help="toy sizes on the CPU (the same code path; tests)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    ap.add_argument("--budget", type=float, default=None, help="seconds for all sections (GPU 530, CPU 900)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="run the sections in this process instead of one child process each (faster with --cpu)")
    ap.add_argument("--section", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("COCOA_PROGRESS", "plain")
    if a.section:
        return run_section(a)
    if a.budget is None:
        a.budget = 900.0 if a.cpu else 530.0
    return orchestrate(a)


if __name__ == "__main__":
    sys.exit(main())
