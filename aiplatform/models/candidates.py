"""Multi-source candidates and their ranker at request time: what a served model version runs.

Why: no single retrieval source wins everywhere. Item-to-item co-occurrence follows the current
session, EASE the whole basket of a user, the two-tower model generalises through categories and
titles, "category x in-category popularity" (``catpop``: the user's learned next-week category
distribution, ``models.category_model``, times each item's share of its category's views) knows
which categories a user returns to, and a user's own recent items are often clicked again. A
LightGBM ranker that sees every source's score and rank next to item, user and user-item
features learns when to trust which (``training.candidates`` fits it on the evaluation's target).

Three modules: ``user_history`` (a user's recent events, from events or from the feature
store), ``candidate_sources`` (the sources and the features: what a request computes) and this
one, the ranker and its artifact. ``CandidateRanker.save``/``load`` write and read all of it as
one folder of the model artifact (``candidates/``: ``npz`` arrays, LightGBM model texts, JSON).
The two-tower source is not stored here: it is the model and its vector index; the caller
passes its candidates (``external``), the index's answer for the user vector. Pure
numpy/pandas/lightgbm: no Ray, no training code. This module re-exports the other two's names,
so callers import from one place.
"""

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from aiplatform.core import storage
from aiplatform.models.candidate_sources import (  # noqa: F401 (re-exported: one import for callers)
    HALF_LIVES,
    INTERNAL_SOURCES,
    POP_WINDOWS,
    CandidateConfig,
    Cands,
    ItemTables,
    _lookup,
    _top_per_row,
    candidate_feature_arrays,
    candidate_features,
    category_affinity,
    dense_source,
    feature_columns,
    predict,
    session_weights,
    source_candidates,
)
from aiplatform.models.category_model import CategoryModel
from aiplatform.models.user_history import TYPE_CODES, TYPE_WEIGHTS, History, history_from_rows  # noqa: F401

CANDIDATES_DIR = "candidates"
"""The folder of a model artifact that holds the candidate sources and the ranker."""
ARRAYS_FILE = "candidates.npz"
CONFIG_FILE = "candidates.json"
RANKER_FILE = "ranker.txt"
CATEGORY_MODEL_FILE = "category_model.json"


# ---- the ranker and the pipeline -------------------------------------------------------------------
@dataclass
class CandidateRanker:
    """Fitted sources (``tables``) and the LightGBM ranker over their merged candidates."""

    config: CandidateConfig
    tables: ItemTables
    booster: object | None = None  # lightgbm.Booster
    feature_names: list[str] = field(default_factory=list)
    external_sources: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def external_candidates(self, item_ids: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> Cands:
        """``Cands`` from per-user lists of item ids and scores (a vector index's answers, one
        list per history row); ids outside the catalogue are dropped."""
        lengths = [len(x) for x in item_ids]
        if lengths != [len(x) for x in scores]:
            raise ValueError("external_candidates: item_ids and scores must have equal lengths per user")
        codes = self.tables.codes([str(i) for x in item_ids for i in x])
        rows = np.repeat(np.arange(len(item_ids)), lengths)
        flat = np.array([float(v) for x in scores for v in x]) if sum(lengths) else np.zeros(0)
        ok = codes >= 0
        return _top_per_row(rows[ok], codes[ok].astype(np.int64), flat[ok], max(max(lengths, default=0), 1))

    @property
    def as_of(self) -> pd.Timestamp | None:
        """When the sources were last fitted (the newest event they saw)."""
        stamp = self.report.get("sources_as_of") or self.report.get("train_end")
        return pd.Timestamp(stamp) if stamp else None

    # ---- serving ---------------------------------------------------------------------------------
    def scored(self, history: History, external: Mapping[str, Cands] | None = None,
               exclude: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The candidates' feature columns (``candidate_feature_arrays``: ``row``, ``item`` and the
        features, sorted by row then item) and the ranker's score of each: what serving needs,
        with no DataFrame in between."""
        missing = set(self.external_sources) - set(external or {})
        if missing:
            raise ValueError(f"the ranker was trained with external source(s) {', '.join(sorted(missing))}: "
                             "pass their candidates in `external`")
        # one run of the category model: the catpop source and the features both read it
        probabilities = self.tables.category_probabilities(history, self.config)
        cands = source_candidates(self.tables, history, self.config, probabilities)
        cands.update(external or {})
        columns = candidate_feature_arrays(self.tables, history, cands, self.config, exclude, probabilities)
        n = len(columns["row"])
        if not n:
            return columns, np.zeros(0)
        x = np.empty((n, len(self.feature_names)), dtype="float32")
        for j, name in enumerate(self.feature_names):
            x[:, j] = columns[name] if name in columns else np.nan  # a source without candidates in this batch
        return columns, predict(self.booster, x)

    def candidates(self, history: History, external: Mapping[str, Cands] | None = None,
                   exclude: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
        """Candidates with features and the ranker's ``score`` (higher first within a row)."""
        columns, score = self.scored(history, external, exclude)
        frame = pd.DataFrame(columns)
        for name in self.feature_names:  # a source without candidates for this batch
            if name not in frame.columns:
                frame[name] = np.nan
        frame["score"] = score
        return frame

    def recommend(self, history: History, k: int, external: Mapping[str, Cands] | None = None,
                  exclude: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[str]]:
        """Top-``k`` item ids per user of ``history`` (purchases excluded unless ``exclude`` is given)."""
        frame = self.candidates(history, external, exclude)
        frame = frame.sort_values(["row", "score", "item"], ascending=[True, False, True], kind="stable")
        frame = frame[frame.groupby("row").cumcount() < k]
        out: list[list[str]] = [[] for _ in range(len(history))]
        for r, i in zip(frame["row"].to_numpy(), frame["item"].to_numpy(), strict=True):
            out[r].append(self.tables.item_ids[i])
        return out

    def source_ranking(self, history: History, source: str, k: int, external: Mapping[str, Cands] | None = None,
                       exclude: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[str]]:
        """Top-``k`` of one source alone (for the study's per-source rows), same exclusions."""
        cands = source_candidates(self.tables, history, self.config)
        cands.update(external or {})
        frame = candidate_features(self.tables, history, {source: cands[source]}, self.config, exclude)
        frame = frame.sort_values(["row", f"{source}_rank"], kind="stable")
        frame = frame[frame.groupby("row").cumcount() < k]
        out: list[list[str]] = [[] for _ in range(len(history))]
        for r, i in zip(frame["row"].to_numpy(), frame["item"].to_numpy(), strict=True):
            out[r].append(self.tables.item_ids[i])
        return out

    # ---- artifact --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write the artifact folder (local or object store): arrays, config and ranker model."""
        directory = str(directory)
        storage.make_dirs(directory)
        arrays = {k: getattr(self.tables, k) for k in _TABLE_ARRAYS}
        arrays["item_ids"] = np.asarray(self.tables.item_ids, dtype=str)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        storage.write_bytes(storage.join(directory, ARRAYS_FILE), buf.getvalue())
        storage.write_bytes(storage.join(directory, RANKER_FILE), self.booster.model_to_string().encode())
        if self.tables.category_model is not None:
            storage.write_json(storage.join(directory, CATEGORY_MODEL_FILE), self.tables.category_model.to_dict())
        cfg = asdict(self.config)
        storage.write_json(storage.join(directory, CONFIG_FILE),
                           {"format": 1, "config": cfg, "n_categories": self.tables.n_categories,
                            "feature_names": self.feature_names, "external_sources": self.external_sources,
                            "report": self.report})

    @classmethod
    def load(cls, directory: str) -> "CandidateRanker":
        """Inverse of ``save``."""
        import lightgbm as lgb

        directory = str(directory)
        meta = storage.read_json(storage.join(directory, CONFIG_FILE))
        raw = storage.read_bytes(storage.join(directory, ARRAYS_FILE))
        model = storage.read_bytes(storage.join(directory, RANKER_FILE))
        if meta is None or raw is None or model is None:
            raise FileNotFoundError(f"{directory}: not a candidate-ranker artifact ({CONFIG_FILE}, {ARRAYS_FILE} "
                                    f"and {RANKER_FILE} are needed)")
        cfg = dict(meta["config"])
        for key in ("features", "sources"):
            if cfg.get(key) is not None:
                cfg[key] = tuple(cfg[key])
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["item_ids"] = arrays["item_ids"].astype(object)
        cat_model = storage.read_json(storage.join(directory, CATEGORY_MODEL_FILE))
        tables = ItemTables(n_categories=int(meta["n_categories"]), **arrays,
                            category_model=CategoryModel.from_dict(cat_model) if cat_model else None)
        return cls(CandidateConfig(**cfg), tables, lgb.Booster(model_str=model.decode()),
                   list(meta["feature_names"]), list(meta["external_sources"]), meta.get("report", {}))


_TABLE_ARRAYS = ("item_ids", "category", "log_price", "pop", "incat", "cat_top", "cooc_idx", "cooc_val", "ease_idx",
                 "ease_val")


def candidates_dir_of(artifact_dir: str) -> str | None:
    """``<artifact>/candidates`` when the version carries a candidate ranker, else None."""
    path = storage.join(str(artifact_dir), CANDIDATES_DIR)
    return path if storage.exists(storage.join(path, CONFIG_FILE)) else None


def load_candidate_config(directory: str) -> CandidateConfig:
    """The ``CandidateConfig`` of a saved ranker (its JSON only: no arrays, no LightGBM), for
    callers that only need to know what it reads (serving's application builder)."""
    meta = storage.read_json(storage.join(str(directory), CONFIG_FILE))
    if meta is None:
        raise FileNotFoundError(f"{directory}: not a candidate-ranker artifact ({CONFIG_FILE} is missing)")
    cfg = dict(meta["config"])
    for key in ("features", "sources", "events_features"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    return CandidateConfig(**cfg)


__all__ = ["CANDIDATES_DIR", "CandidateConfig", "CandidateRanker", "Cands", "History", "ItemTables",
           "candidate_features", "candidates_dir_of", "category_affinity", "dense_source", "feature_columns",
           "history_from_rows", "load_candidate_config", "source_candidates"]
