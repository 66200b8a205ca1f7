"""Precision@1 scoring and MMEB-style aggregation.

Scoring rule (one evaluation record = one query and its candidate list, candidate 0 is the positive):

* similarity is the cosine of the L2-normalised embeddings (a dot product);
* the record is a hit when the positive's similarity is **strictly greater** than every distractor's.
  A tie counts against the positive, so a collapsed model (all embeddings equal) scores 0, not 1.
  (VLM2Vec's ``argmax(scores) == 0`` lets the lowest index win ties; the two rules differ only on exact
  ties.)
* an exact tie is decided by content: a distractor whose embedding equals the positive's bit for bit
  ties it (a miss), whatever their positions in the candidate matrix; similarities are computed once per
  distinct embedding, so float noise between BLAS kernels cannot break or create a tie.
* a distractor whose content is identical to the positive's (same text and same image, hence the same
  cache key) is not a distractor and is left out of the comparison; a record with no distractor left is
  a hit. Such records are counted (``n_trivial``) in the result so nothing passes unnoticed.

Aggregation follows VLM2Vec/MMEB: every average is an unweighted mean over *datasets* (not over
queries): per meta-task, per split (IND/OOD) and overall. An average over no dataset is ``None``
(shown as "-").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

META_TASKS = ("classification", "vqa", "retrieval", "grounding")
SPLITS = ("IND", "OOD")
RESULT_FORMAT = "cocoa-eval-result"


def pad_candidates(cand_index: Sequence[Sequence[int]]) -> np.ndarray:
    """Ragged candidate index lists -> an ``[N, K]`` int64 matrix padded with -1."""
    k = max((len(c) for c in cand_index), default=0)
    out = np.full((len(cand_index), max(k, 1)), -1, dtype=np.int64)
    for i, c in enumerate(cand_index):
        if len(c) == 0:
            raise ValueError(f"query {i} has no candidate (candidate 0 must be the positive)")
        out[i, : len(c)] = c
    return out


def hits_at_1(query_emb: np.ndarray, cand_emb: np.ndarray, cand_index: Sequence[Sequence[int]] | np.ndarray,
              *, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Which queries rank their positive first.

    ``query_emb`` ``[N, D]`` and ``cand_emb`` ``[M, D]`` are L2-normalised; ``cand_index[n]`` lists the
    rows of ``cand_emb`` that are query ``n``'s candidates, the positive first (ragged lists or an
    ``[N, K]`` matrix padded with -1). Returns ``(hits [N] bool, trivial [N] bool)`` where ``trivial``
    marks records left with no distractor (every distractor equal to the positive, or none at all).
    """
    q = np.asarray(query_emb, dtype=np.float32)
    c = np.asarray(cand_emb, dtype=np.float32)
    idx = cand_index if isinstance(cand_index, np.ndarray) else pad_candidates(cand_index)
    if q.ndim != 2 or c.ndim != 2 or q.shape[1] != c.shape[1]:
        raise ValueError(f"embedding shapes do not match: queries {q.shape}, candidates {c.shape}")
    if idx.shape[0] != q.shape[0]:
        raise ValueError(f"{q.shape[0]} queries but {idx.shape[0]} candidate lists")
    if idx.size and (idx.max() >= c.shape[0] or (idx[:, 0] < 0).any()):
        raise ValueError("candidate index out of range (or a query without its positive)")
    n = q.shape[0]
    hits = np.zeros(n, dtype=bool)
    trivial = np.zeros(n, dtype=bool)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        ix = idx[s:e]
        # only the candidates this chunk uses, and each distinct embedding once: identical vectors share
        # one column of the product, so they score identically by construction (BLAS may compute
        # different output columns with different kernels, 1-2 ulp apart: an exact tie must be decided
        # by content, never by a candidate's position)
        used, inv = np.unique(np.where(ix < 0, ix[:, :1], ix), return_inverse=True)
        rows_u, inv_rows = np.unique(c[used], axis=0, return_inverse=True)
        col = inv_rows.reshape(-1)[inv.reshape(ix.shape)]  # [chunk, K] -> column of its distinct vector
        sims = q[s:e] @ rows_u.T  # [chunk, U']
        sc = np.take_along_axis(sims, col, axis=1)  # [chunk, K]
        pos = sc[:, 0]
        distractor = (ix >= 0) & (ix != ix[:, :1])
        distractor[:, 0] = False
        best_other = np.where(distractor, sc, -np.inf).max(axis=1)
        hits[s:e] = pos > best_other
        trivial[s:e] = ~distractor.any(axis=1)
    return hits, trivial


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
class DatasetScore(BaseModel):
    model_config = ConfigDict(extra="forbid")

    meta_task: str
    split: str
    p_at_1: float
    hits: int
    n: int
    n_trivial: int = 0
    n_skipped: int = Field(0, description="source rows left out as unusable (MMEB with on_bad_row=skip)")
    n_candidates: float = Field(0.0, description="mean candidates per query")


class EvalResult(BaseModel):
    """What one ``cocoa-eval`` run found. Scores are fractions in [0, 1] (tables show percent)."""

    model_config = ConfigDict(extra="forbid")

    format: str = RESULT_FORMAT
    version: int = 1
    model: str = ""
    model_hash: str = ""
    benchmark: str = ""
    label: str = ""
    datasets: dict[str, DatasetScore] = Field(default_factory=dict)
    meta_tasks: dict[str, float | None] = Field(default_factory=dict)
    splits: dict[str, float | None] = Field(default_factory=dict)
    overall: float | None = None
    spec: dict[str, Any] = Field(default_factory=dict)
    encode: dict[str, Any] = Field(default_factory=dict)
    created: float = Field(default_factory=time.time)
    cocoa_version: str = ""

    # -- io ------------------------------------------------------------------------------------
    def save_json(self, path: str | Path) -> Path:
        from ..shards import atomic_write_json

        atomic_write_json(path, self.model_dump(mode="json"))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> EvalResult:
        import json

        from ..records import RecordError

        path = Path(path)
        if path.is_dir():
            path = path / "results.json"
        if not path.is_file():
            raise RecordError(f"{path}: no such results file; pass the results.json written by cocoa-eval")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RecordError(f"{path} is not valid JSON ({e}); pass the results.json written by cocoa-eval") from None
        if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
            raise RecordError(f"{path} is not a cocoa-eval results file (format != {RESULT_FORMAT!r})")
        try:
            return cls.model_validate(data)
        except Exception as e:
            raise RecordError(f"{path} is a malformed cocoa-eval results file ({e})") from None

    # -- flat view (for aggregating several runs, e.g. seeds of an ablation) --------------------
    def summary(self) -> dict[str, float | None]:
        """``{"overall": .., "classification": .., ..., "IND": .., "OOD": .., "<dataset>": ..}``."""
        out: dict[str, float | None] = {"overall": self.overall}
        out.update({m: self.meta_tasks.get(m) for m in META_TASKS})
        out.update({s: self.splits.get(s) for s in SPLITS})
        out.update({name: d.p_at_1 for name, d in self.datasets.items()})
        return out


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def aggregate(datasets: dict[str, DatasetScore]) -> tuple[dict[str, float | None], dict[str, float | None], float | None]:
    """MMEB averaging: unweighted means over datasets per meta-task, per split, and overall."""
    meta = {m: _mean([d.p_at_1 for d in datasets.values() if d.meta_task == m]) for m in META_TASKS}
    for d in datasets.values():  # a meta-task outside the four (should not happen) still gets its row
        if d.meta_task not in meta:
            meta[d.meta_task] = _mean([x.p_at_1 for x in datasets.values() if x.meta_task == d.meta_task])
    splits = {s: _mean([d.p_at_1 for d in datasets.values() if d.split == s]) for s in SPLITS}
    overall = _mean([d.p_at_1 for d in datasets.values()])
    return meta, splits, overall


def dataset_score(meta_task: str, split: str, hits: np.ndarray, trivial: np.ndarray, n_candidates: float,
                  n_skipped: int = 0) -> DatasetScore:
    n = int(hits.shape[0])
    h = int(hits.sum())
    return DatasetScore(meta_task=meta_task, split=split, p_at_1=(h / n) if n else 0.0, hits=h, n=n,
                        n_trivial=int(trivial.sum()), n_skipped=int(n_skipped), n_candidates=float(n_candidates))


def summarize_runs(results: Sequence[EvalResult]) -> dict[str, dict[str, float | int | None]]:
    """Mean and sample std (ddof=1; 0 for one run) of every :meth:`EvalResult.summary` key over several
    runs (e.g. seeds of one ablation arm): ``{"overall": {"mean": .., "std": .., "n": ..}, "vqa": ...}``.
    Runs where a key is ``None``/absent are left out of that key's statistics (``n`` says how many counted)."""
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.summary() if k not in keys]
    out: dict[str, dict[str, float | int | None]] = {}
    for k in keys:
        vals = [v for r in results if (v := r.summary().get(k)) is not None]
        if not vals:
            out[k] = {"mean": None, "std": None, "n": 0}
            continue
        arr = np.asarray(vals, dtype=np.float64)
        out[k] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}
    return out
