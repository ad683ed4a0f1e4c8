"""A model artifact's torch-free parts: the item vocabulary, the file names, and the small
readers (vocabulary, input spec, extra metadata).

Why a module of its own: serving loads an artifact without torch (importing torch costs a
replica ~1.7 s of its cold start, and the serving user tower is numpy: ``models.user_tower``).
``models.two_tower`` re-exports everything here, so training code keeps one import.

Index conventions (``ItemVocab``): index 0 is always "padding or unknown" for items, categories,
price buckets and title-token buckets; real values start at 1. ``n_items``/``n_categories``/
``n_price_buckets``/``title_buckets`` count the real values, so every table has ``n + 1`` rows.
"""

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError
from aiplatform.models.inputs import UserInputSpec, encode_dense

if TYPE_CHECKING:
    import torch

DEFAULT_PRICE_BUCKETS = 10
DEFAULT_TITLE_BUCKETS = 512
TITLE_TOKENS = 8
"""Tokens kept per title (the first ones): titles are short, and a fixed width keeps the table dense."""
UNKNOWN_CATEGORY = ""

MODEL_FILE = "model.pt"
CONFIG_FILE = "model_config.json"
VOCAB_FILE = "vocab.json"
EXTRA_FILE = "extra.json"


@dataclass
class ItemVocab:
    """Maps catalogue ids and attributes to the integer indices the model embeds.

    Built once from the items catalogue and saved next to the weights, so every consumer
    (training workers, evaluation, index build, serving) encodes ids identically.
    """

    item_ids: list[str]
    categories: list[str]
    item_category: list[int]
    price_boundaries: list[float]
    item_price_bucket: list[int]
    title_buckets: int = 0
    item_title_tokens: list[list[int]] = field(default_factory=list)
    _lookup: pd.Index | None = field(default=None, init=False, repr=False, compare=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_items(cls, items: pd.DataFrame, n_price_buckets: int = DEFAULT_PRICE_BUCKETS,
                   title_buckets: int = DEFAULT_TITLE_BUCKETS) -> "ItemVocab":
        """Vocabulary of a catalogue: one index per distinct ``item_id`` (first row wins).

        Price buckets are quantiles of the known prices, so they stay balanced whatever the
        currency or range; a missing price or category gets index 0. Title words are hashed
        into ``title_buckets`` buckets (0 turns titles off) once here, per item, so encoding a
        training example never touches text.
        """
        if "item_id" not in items.columns:
            raise ValueError("items: column 'item_id' is required")
        df = items.dropna(subset=["item_id"]).copy()
        df["item_id"] = df["item_id"].astype(str)
        df = df.drop_duplicates("item_id", keep="first").sort_values("item_id", kind="stable")
        item_ids = df["item_id"].tolist()

        cats = df["category"] if "category" in df.columns else pd.Series([None] * len(df), index=df.index)
        cats = cats.astype(object).where(cats.notna(), None)
        categories = sorted({str(c) for c in cats if c is not None and str(c) != UNKNOWN_CATEGORY})
        cat_index = {c: j + 1 for j, c in enumerate(categories)}
        item_category = [0] + [cat_index.get(str(c), 0) if c is not None else 0 for c in cats]

        prices = (
            pd.to_numeric(df["price"], errors="coerce").to_numpy(dtype="float64")
            if "price" in df.columns
            else np.full(len(df), np.nan)
        )
        known = prices[np.isfinite(prices)]
        if len(known) and n_price_buckets > 1:
            qs = np.quantile(known, np.linspace(0, 1, n_price_buckets + 1)[1:-1])
            boundaries = sorted({float(q) for q in qs})
        else:
            boundaries = []
        vocab = cls(item_ids, categories, item_category, boundaries, [0])
        vocab.item_price_bucket = [0] + vocab.price_buckets(prices).tolist()
        if title_buckets < 0:
            raise ValueError(f"title_buckets must be >= 0 (0 = no title feature), got {title_buckets}")
        vocab.title_buckets = int(title_buckets)
        titles = df["title"] if "title" in df.columns else pd.Series([None] * len(df), index=df.index)
        vocab.item_title_tokens = [[]] + [hash_title(t, title_buckets) for t in titles]
        return vocab

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_categories(self) -> int:
        return len(self.categories)

    @property
    def n_price_buckets(self) -> int:
        """Real buckets: ``len(price_boundaries) + 1`` intervals (index 0 = unknown price)."""
        return len(self.price_boundaries) + 1

    def model_kwargs(self) -> dict:
        """The vocabulary-dependent arguments of ``TwoTowerModel``."""
        kwargs = {
            "n_items": self.n_items,
            "n_categories": self.n_categories,
            "n_price_buckets": self.n_price_buckets,
            "item_category": list(self.item_category),
            "item_price_bucket": list(self.item_price_bucket),
        }
        if self.title_buckets > 0:
            kwargs["title_buckets"] = self.title_buckets
            kwargs["item_title_tokens"] = self.title_token_matrix().tolist()
        return kwargs

    def title_token_matrix(self, width: int = TITLE_TOKENS) -> np.ndarray:
        """[n_items + 1, width] int64 hashed title tokens, 0-padded (row 0 = padding item)."""
        out = np.zeros((self.n_items + 1, width), dtype="int64")
        for row, toks in enumerate(self.item_title_tokens[: self.n_items + 1]):
            toks = toks[:width]
            out[row, : len(toks)] = toks
        return out

    # ---- encoding --------------------------------------------------------------------------
    def price_buckets(self, prices: np.ndarray) -> np.ndarray:
        """Bucket index per price: 1..n_price_buckets, 0 for a missing price."""
        prices = np.asarray(prices, dtype="float64")
        out = np.searchsorted(np.asarray(self.price_boundaries, dtype="float64"), prices, side="right") + 1
        return np.where(np.isfinite(prices), out, 0).astype("int64")

    def _index(self) -> pd.Index:
        if self._lookup is None:
            self._lookup = pd.Index(self.item_ids, dtype=object)
        return self._lookup

    def index(self, item_id: str) -> int:
        """Index of one item id; 0 if it is not in the catalogue."""
        return int(self.indices([item_id])[0])

    def indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """Indices (int64) of many item ids at once; 0 for unknown ids or None."""
        ids = np.asarray(item_ids, dtype=object).reshape(-1)
        if ids.size == 0:
            return np.zeros(0, dtype="int64")
        pos = self._index().get_indexer(ids)
        return (pos + 1).astype("int64")  # -1 (missing) becomes 0

    def encode_history(self, histories: Sequence[Sequence[str] | None], history_len: int) -> np.ndarray:
        """[B, history_len] int64: the first ``history_len`` items (most recent first), 0-padded.

        Unknown items are dropped before truncation rather than kept as 0s, so a user whose
        recent items left the catalogue still gets a full history of known items.
        """
        rows = [list(x) if x is not None else [] for x in histories]
        out = np.zeros((len(rows), history_len), dtype="int64")
        lengths = np.fromiter((len(r) for r in rows), dtype="int64", count=len(rows))
        if lengths.sum() == 0:
            return out
        flat = self.indices([item for r in rows for item in r])
        row_of = np.repeat(np.arange(len(rows)), lengths)
        keep = flat > 0
        flat, row_of = flat[keep], row_of[keep]
        # position of each kept item within its row
        starts = np.r_[0, np.cumsum(np.bincount(row_of, minlength=len(rows)))[:-1]]
        pos = np.arange(len(flat)) - starts[row_of]
        ok = pos < history_len
        out[row_of[ok], pos[ok]] = flat[ok]
        return out

    def encode_users(
        self, histories: Sequence[Sequence[str]], dense: np.ndarray, history_len: int
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Model inputs of a batch of users: (hist LongTensor [B, history_len], dense [B, n]).

        ``dense`` holds the raw dense feature values (``UserInputSpec.dense_values``); they are
        scaled here by ``models.inputs.encode_dense`` (signed log1p, NaN -> 0).
        """
        import torch  # training and evaluation only: serving calls encode_user_arrays

        return tuple(torch.from_numpy(a) for a in self.encode_user_arrays(histories, dense, history_len))

    def encode_user_arrays(
        self, histories: Sequence[Sequence[str]], dense: np.ndarray, history_len: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``encode_users`` as numpy arrays (hist int64, dense float32): what the serving tower reads."""
        hist = self.encode_history(histories, history_len)
        values = encode_dense(dense)
        if values.shape[0] != hist.shape[0]:
            raise ValueError(f"encode_users: {hist.shape[0]} histories but {values.shape[0]} dense rows")
        return hist, values

    def encode_batch(self, spec: UserInputSpec, batch) -> tuple[np.ndarray, np.ndarray]:
        """(hist [B, history_len] int64, dense [B, n_dense] float32) of a frame or dict of columns
        read through ``spec``: the one encoding training, evaluation and serving share."""
        hist = self.encode_history(spec.histories(batch), spec.history_len)
        return hist, encode_dense(spec.dense_values(batch).reshape(len(hist), spec.n_dense))

    # ---- persistence -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "item_ids": list(self.item_ids),
            "categories": list(self.categories),
            "item_category": [int(x) for x in self.item_category],
            "price_boundaries": [float(x) for x in self.price_boundaries],
            "item_price_bucket": [int(x) for x in self.item_price_bucket],
            "title_buckets": int(self.title_buckets),
            "item_title_tokens": [[int(t) for t in toks] for toks in self.item_title_tokens],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ItemVocab":
        """Inverse of ``to_dict``; a vocabulary saved before titles existed loads without them."""
        vocab = cls(
            item_ids=[str(x) for x in d["item_ids"]],
            categories=[str(x) for x in d["categories"]],
            item_category=[int(x) for x in d["item_category"]],
            price_boundaries=[float(x) for x in d["price_boundaries"]],
            item_price_bucket=[int(x) for x in d["item_price_bucket"]],
            title_buckets=int(d.get("title_buckets", 0)),
            item_title_tokens=[[int(t) for t in toks] for toks in d.get("item_title_tokens", [])],
        )
        n = len(vocab.item_ids) + 1
        if len(vocab.item_category) != n or len(vocab.item_price_bucket) != n:
            raise ValueError(
                f"vocab: item_category/item_price_bucket must have {n} entries "
                f"(n_items + 1), got {len(vocab.item_category)}/{len(vocab.item_price_bucket)}"
            )
        if vocab.title_buckets and len(vocab.item_title_tokens) != n:
            raise ValueError(f"vocab: item_title_tokens must have {n} entries (n_items + 1), "
                             f"got {len(vocab.item_title_tokens)}")
        return vocab


_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def hash_title(title: object, buckets: int, max_tokens: int = TITLE_TOKENS) -> list[int]:
    """Bucket ids (1..buckets) of the distinct lower-cased words of ``title``, in order.

    crc32, not ``hash()``: Python salts ``hash`` per process, and every worker, the index
    builder and serving must map a word to the same bucket. Missing titles give [].
    """
    if buckets <= 0 or title is None or (not isinstance(title, str) and bool(pd.isna(title))):
        return []
    out: list[int] = []
    for word in _WORD.findall(str(title).lower()):
        b = 1 + zlib.crc32(word.encode("utf-8")) % buckets
        if b not in out:
            out.append(b)
        if len(out) == max_tokens:
            break
    return out


def load_vocab(directory: str) -> ItemVocab:
    """Only the vocabulary of an artifact (local folder or URI): one small file read, no model."""
    data = storage.read_json(storage.join(str(directory), VOCAB_FILE))
    if data is None:
        raise FileNotFoundError(f"{directory}: not a model artifact ({VOCAB_FILE} is missing)")
    return ItemVocab.from_dict(data)


def load_input_spec(directory: str) -> UserInputSpec:
    """The ``UserInputSpec`` a model artifact (local folder or URI) was trained with: one small
    file read, no weights. A ``ConfigError`` when the artifact predates input specs."""
    config = storage.read_json(storage.join(str(directory), CONFIG_FILE))
    if config is None:
        raise FileNotFoundError(f"{directory}: not a model artifact ({CONFIG_FILE} is missing)")
    if not config.get("inputs"):
        raise ConfigError(f"model artifact {directory} records no input spec (it was trained before the "
                          "feature service's inputs were saved with the model): retrain it with "
                          "python -m aiplatform.jobs.train")
    return UserInputSpec.from_dict(config["inputs"])


def read_extra(directory: str) -> dict:
    """The ``extra.json`` of an artifact (local folder or URI), or {} when it has none."""
    return storage.read_json(storage.join(str(directory), EXTRA_FILE), {}) or {}
