"""Local ``transformers`` teacher: batched ``generate`` with left padding, for small teachers and CPU.

Named ``hf.py`` (not ``transformers.py``, which would shadow the library). Outputs are not schema-
constrained here; the orchestrator validates each one and retries/quarantines as for every backend.
Sampling within a batch shares one torch generator seeded from the batch's first request, so a
request's output can depend on which batch it ran in (use temperature 0 for strict reproducibility).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import Teacher, TeacherError, TeacherRequest, TeacherResult, checked_result

PLAIN_LAYOUT = "<|vision_start|><|image_pad|><|vision_end|>{prompt}\n"


class TransformersTeacher(Teacher):
    backend = "transformers"

    def __init__(self, model: str, revision: str = "", *, device: str = "auto", dtype: str = "auto",
                 batch_size: int = 4, min_pixels: int | None = None, max_pixels: int | None = None) -> None:
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model, self.revision = model, revision
        self.batch_size = max(1, int(batch_size))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            tdtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            try:
                tdtype = getattr(torch, dtype)
            except AttributeError:
                raise TeacherError(f"--dtype {dtype!r} is not a torch dtype (float32, bfloat16, float16)") from None
        kw: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            self.processor = AutoProcessor.from_pretrained(model, **kw)
            self.net = AutoModelForImageTextToText.from_pretrained(model, dtype=tdtype, **kw).to(self.device).eval()
        except OSError as e:
            raise TeacherError(f"cannot load teacher model {model!r} with transformers: {e}") from None
        ip = getattr(self.processor, "image_processor", None)
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and ip is not None:
                setattr(ip, name, value)
                if isinstance(getattr(ip, "size", None), dict):
                    ip.size["shortest_edge" if name == "min_pixels" else "longest_edge"] = value
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._has_template = bool(getattr(self.processor, "chat_template", None))

    def _text(self, r: TeacherRequest) -> str:
        if self._has_template:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.prompt}]}]
            return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return PLAIN_LAYOUT.format(prompt=r.prompt)

    def generate(self, requests: Sequence[TeacherRequest]) -> list[TeacherResult]:
        out: list[TeacherResult] = []
        for i in range(0, len(requests), self.batch_size):
            out += self._batch(list(requests[i:i + self.batch_size]))
        return out

    def _batch(self, batch: list[TeacherRequest]) -> list[TeacherResult]:
        import torch

        from ...records import decode_image

        images = [decode_image(r.image) for r in batch]
        inputs = self.processor(text=[self._text(r) for r in batch], images=images, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        s = batch[0].sampling
        gen_kw: dict[str, Any] = {"max_new_tokens": s.max_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if s.temperature > 0:
            gen_kw.update(do_sample=True, temperature=s.temperature, top_p=s.top_p)
        else:
            gen_kw.update(do_sample=False)
        torch.manual_seed(batch[0].seed)
        with torch.inference_mode():
            seqs = self.net.generate(**inputs, **gen_kw)
        prompt_len = inputs["input_ids"].shape[1]
        new = seqs[:, prompt_len:]
        eos = set(_as_list(getattr(self.net.generation_config, "eos_token_id", None))) | {self.tokenizer.pad_token_id}
        results = []
        for j, r in enumerate(batch):
            ids = new[j].tolist()
            n = next((t for t, x in enumerate(ids) if x in eos), len(ids))
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=True)
            n_prompt = int(inputs["attention_mask"][j].sum()) if "attention_mask" in inputs else prompt_len
            results.append(checked_result(r.key, text, prompt_tokens=n_prompt, completion_tokens=n))
        return results


def _as_list(x: Any) -> list[int]:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [int(x)]
