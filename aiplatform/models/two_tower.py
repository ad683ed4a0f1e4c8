"""Two-tower retrieval model: a user tower and an item tower that meet in one vector space.

The item tower's output is what the vector index stores; the user tower's output is the query.
Both are L2-normalised, so a dot product is a cosine similarity and the index can use it as is.

This module is torch only (no Ray): training, evaluation, the index builder and serving all
load the same artifact with ``load_artifact`` and need nothing else. An artifact is a folder,
local or in the object store (``s3://…/models/two_tower/3``): a URI is downloaded once per node
(``storage.local_copy``; registered artifacts never change) and loaded from there.

Index conventions (``ItemVocab``): index 0 is always "padding or unknown" for items, categories,
price buckets and title-token buckets; real values start at 1. ``n_items``/``n_categories``/
``n_price_buckets``/``title_buckets`` count the real values, so every table has ``n + 1`` rows.
"""

import io
import json
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError
from aiplatform.models.inputs import UserInputSpec, encode_dense, input_sizes

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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model inputs of a batch of users: (hist LongTensor [B, history_len], dense [B, n]).

        ``dense`` holds the raw dense feature values (``UserInputSpec.dense_values``); they are
        scaled here by ``models.inputs.encode_dense`` (signed log1p, NaN -> 0).
        """
        hist = self.encode_history(histories, history_len)
        values = encode_dense(dense)
        if values.shape[0] != hist.shape[0]:
            raise ValueError(f"encode_users: {hist.shape[0]} histories but {values.shape[0]} dense rows")
        return torch.from_numpy(hist), torch.from_numpy(values)

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


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.ReLU(), nn.Linear(d_hidden, d_out))


class TwoTowerModel(nn.Module):
    """User tower and item tower, trained with an in-batch sampled softmax.

    The item-id (and category) embedding tables are **shared** between the towers: the user
    tower mean-pools the same [item-id ‖ category] vectors that the item tower starts from.
    Why: a history item and a target item are the same kind of object, so sharing lets every
    interaction train the table twice (as context and as target), halves the largest parameter
    block, and lets items that are mostly seen as history still get a good vector. The towers'
    MLPs keep the two roles separate where they need to differ.

    Pooling the category embedding along with the id lets the user tower generalise across
    items of a category it has seen, which matters for rarely seen (long-tail) items.
    """

    def __init__(
        self,
        n_items: int,
        n_categories: int,
        n_price_buckets: int,
        item_category: list[int],
        item_price_bucket: list[int],
        dim: int = 64,
        n_dense: int | None = None,
        history_len: int | None = None,
        temperature: float = 0.05,
        title_buckets: int = 0,
        title_len: int = TITLE_TOKENS,
        item_title_tokens: "Sequence[Sequence[int]] | None" = None,
        recency: bool = False,
        uniform_negatives: int = 0,
        inputs: "UserInputSpec | dict | None" = None,
    ) -> None:
        super().__init__()
        spec = UserInputSpec.from_dict(inputs) if isinstance(inputs, dict) else inputs
        n_dense, history_len = input_sizes(spec, n_dense, history_len)
        self.inputs: UserInputSpec | None = spec
        """What the model reads of a user (``models.inputs``); None for a bare hand-made model."""
        if len(item_category) != n_items + 1 or len(item_price_bucket) != n_items + 1:
            raise ValueError("item_category and item_price_bucket need n_items + 1 entries (index 0 = padding)")
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        if title_buckets < 0 or title_len < 1:
            raise ValueError("title_buckets must be >= 0 and title_len >= 1")
        self._config = {
            "n_items": int(n_items),
            "n_categories": int(n_categories),
            "n_price_buckets": int(n_price_buckets),
            "item_category": [int(x) for x in item_category],
            "item_price_bucket": [int(x) for x in item_price_bucket],
            "dim": int(dim),
            "n_dense": int(n_dense),
            "history_len": int(history_len),
            "temperature": float(temperature),
            "title_buckets": int(title_buckets),
            "title_len": int(title_len),
            "recency": bool(recency),
            "uniform_negatives": int(uniform_negatives),
            "inputs": spec.to_dict() if spec is not None else None,
        }
        self.dim = dim
        self.history_len = history_len
        self.temperature = temperature
        cat_dim = max(8, dim // 4)
        price_dim = max(4, dim // 8)
        dense_dim = max(8, dim // 2)

        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.cat_emb = nn.Embedding(n_categories + 1, cat_dim, padding_idx=0)
        self.price_emb = nn.Embedding(n_price_buckets + 1, price_dim, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.1)
        nn.init.normal_(self.cat_emb.weight, std=0.1)
        nn.init.normal_(self.price_emb.weight, std=0.1)
        with torch.no_grad():
            for emb in (self.item_emb, self.cat_emb, self.price_emb):
                emb.weight[0].zero_()
        # Lookup tables, not parameters; rebuilt from the config, so not stored in state_dict.
        self.register_buffer("item_category", torch.tensor(item_category, dtype=torch.long), persistent=False)
        self.register_buffer("item_price_bucket", torch.tensor(item_price_bucket, dtype=torch.long), persistent=False)
        # log of each item's sampling probability among training targets (logQ correction);
        # zeros (no correction) until set_item_frequencies() is called. Training-only state.
        self.register_buffer("log_q", torch.zeros(n_items + 1), persistent=False)

        # Title words (item tower only): a mean of hashed-word vectors. The token table is a
        # persistent buffer, so it travels in the state_dict instead of bloating the config.
        title_dim = max(8, dim // 4) if title_buckets > 0 else 0
        if title_buckets > 0:
            self.title_emb = nn.EmbeddingBag(title_buckets + 1, title_dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.title_emb.weight, std=0.1)
            with torch.no_grad():
                self.title_emb.weight[0].zero_()
            tokens = torch.zeros(n_items + 1, title_len, dtype=torch.long)
            if item_title_tokens is not None:
                if len(item_title_tokens) != n_items + 1:
                    raise ValueError("item_title_tokens needs n_items + 1 rows (row 0 = padding item)")
                for row, toks in enumerate(item_title_tokens):
                    toks = [int(t) for t in toks][:title_len]
                    if toks and (min(toks) < 0 or max(toks) > title_buckets):
                        raise ValueError(f"item_title_tokens row {row}: token ids must be in 0..{title_buckets}")
                    tokens[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            self.register_buffer("item_title", tokens)
        # Recency (off by default): a learned weight per history position, most recent first,
        # started at a 0.9 decay. Measured on the shop: it learns to look at the last item only
        # (next-event targets sit in the current session) and recall@10 over the next week drops
        # from 0.295 to 0.241, so the plain mean stays the default.
        if recency:
            self.pos_logit = nn.Parameter(torch.arange(history_len, dtype=torch.float32) * float(np.log(0.9)))

        self.dense_mlp = nn.Sequential(nn.Linear(n_dense, dense_dim), nn.ReLU())
        self.user_mlp = _mlp(dim + cat_dim + dense_dim, 2 * dim, dim)
        self.item_mlp = _mlp(dim + cat_dim + price_dim + title_dim, 2 * dim, dim)

    def config(self) -> dict:
        """Constructor kwargs (JSON-serialisable): ``TwoTowerModel(**m.config())`` rebuilds it."""
        return json.loads(json.dumps(self._config))

    def _item_features(self, item_idx: Tensor) -> Tensor:
        return torch.cat([self.item_emb(item_idx), self.cat_emb(self.item_category[item_idx])], dim=-1)

    def user_embedding(self, hist: Tensor, dense: Tensor) -> Tensor:
        """[B, dim] L2-normalised query vectors from history indices [B, L] and dense [B, n_dense]."""
        if dense.shape[-1] != self._config["n_dense"]:
            raise ValueError(f"dense inputs: expected {self._config['n_dense']} features "
                             f"({_dense_names(self.inputs)}), got {dense.shape[-1]}")
        hist = hist.long()
        mask = (hist > 0).unsqueeze(-1).to(self.item_emb.weight.dtype)  # [B, L, 1]
        if self._config["recency"]:
            mask = mask * torch.exp(self.pos_logit[: hist.shape[1]]).view(1, -1, 1)
        feats = self._item_features(hist)  # [B, L, D]
        pooled = (feats * mask).sum(1) / mask.sum(1).clamp(min=1e-6)  # zeros for an empty history
        x = torch.cat([pooled, self.dense_mlp(dense.to(pooled.dtype))], dim=-1)
        return F.normalize(self.user_mlp(x), dim=-1)

    def item_embedding(self, item_idx: Tensor) -> Tensor:
        """[B, dim] L2-normalised item vectors (what the vector index stores)."""
        item_idx = item_idx.long()
        parts = [self._item_features(item_idx), self.price_emb(self.item_price_bucket[item_idx])]
        if self._config["title_buckets"] > 0:
            shape = item_idx.shape
            title = self.title_emb(self.item_title[item_idx.reshape(-1)])  # [N, title_dim]
            parts.append(title.reshape(*shape, -1))
        return F.normalize(self.item_mlp(torch.cat(parts, dim=-1)), dim=-1)

    def set_item_frequencies(self, counts: "np.ndarray | list[float]") -> None:
        """Enable the logQ correction from how often each item index is a training target.

        In-batch negatives are drawn in proportion to popularity, so without the correction
        the model learns popularity-discounted scores and under-recommends popular items
        (Yi et al., 2019). Add-one smoothing keeps unseen items finite.
        """
        c = torch.as_tensor(np.asarray(counts, dtype=np.float64) + 1.0)
        if c.shape[0] != self.log_q.shape[0]:
            raise ValueError(f"need {self.log_q.shape[0]} counts (one per item index), got {c.shape[0]}")
        self.log_q.copy_(torch.log(c / c.sum()).to(self.log_q.dtype))

    def loss(self, hist: Tensor, dense: Tensor, item_idx: Tensor) -> Tensor:
        """In-batch sampled softmax: each user's positive against the other rows' items.

        Logits are cosine similarities divided by ``temperature``, minus log q(item) (the
        logQ correction; zero unless ``set_item_frequencies`` was called). When the same item
        is the positive of several rows, those other copies are masked out of each row's
        negatives: otherwise the model would be pushed away from an item the user did
        interact with.
        """
        item_idx = item_idx.long().reshape(-1)
        u = self.user_embedding(hist, dense)
        v = self.item_embedding(item_idx)
        logits = (u @ v.T) / self.temperature - self.log_q[item_idx].unsqueeze(0)
        same = item_idx.unsqueeze(0) == item_idx.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        m = self._config["uniform_negatives"]
        if m > 0 and self.training:
            # Mixed negatives (Yang et al., 2020): in-batch negatives are drawn by popularity and
            # rarely include tail items, so M uniform draws are added. Each column is corrected
            # by the log of its expected count under its own proposal: B * q(j) in-batch, M / n
            # uniform (only differences between columns matter, so log B is added to the latter).
            n = self._config["n_items"]
            extra = torch.randint(1, n + 1, (m,), device=item_idx.device)
            correction = float(np.log(m / n) - np.log(len(item_idx)))
            extra_logits = (u @ self.item_embedding(extra).T) / self.temperature - correction
            extra_logits = extra_logits.masked_fill(extra.unsqueeze(0) == item_idx.unsqueeze(1), float("-inf"))
            logits = torch.cat([logits, extra_logits], dim=1)
        labels = torch.arange(len(item_idx), device=logits.device)
        return F.cross_entropy(logits, labels)

    def forward(self, hist: Tensor, dense: Tensor, item_idx: Tensor) -> Tensor:
        """The training loss; DistributedDataParallel only syncs gradients through ``forward``."""
        return self.loss(hist, dense, item_idx)

    @torch.no_grad()
    def all_item_embeddings(self, batch_size: int = 65536) -> Tensor:
        """[n_items + 1, dim] vectors of every index (row 0 is the padding item: ignore it)."""
        n = self._config["n_items"] + 1
        device = self.item_emb.weight.device
        parts = [
            self.item_embedding(torch.arange(s, min(s + batch_size, n), device=device))
            for s in range(0, n, batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)


def _dense_names(spec: UserInputSpec | None) -> str:
    return ", ".join(spec.dense) if spec is not None else "no input spec"


# ---- artifacts ---------------------------------------------------------------------------------
def save_artifact(model: TwoTowerModel, vocab: ItemVocab, directory: str, extra: dict | None = None) -> None:
    """Write a self-contained, loadable model directory (each file atomically).

    ``model.pt`` (CPU state_dict), ``model_config.json`` (constructor kwargs), ``vocab.json``
    and, if given, ``extra.json`` (metrics, params, lineage: anything JSON). ``directory`` may
    be a local folder or an object-store URI.
    """
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    directory = str(directory)
    storage.make_dirs(directory)
    state = {k: t.detach().cpu() for k, t in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(directory, MODEL_FILE), buf.getvalue())
    storage.write_json(storage.join(directory, CONFIG_FILE), model.config())
    storage.write_json(storage.join(directory, VOCAB_FILE), vocab.to_dict())
    if extra is not None:
        storage.write_json(storage.join(directory, EXTRA_FILE), extra)


def load_artifact(directory: str) -> tuple[TwoTowerModel, ItemVocab]:
    """The model (eval mode, CPU) and vocabulary saved by ``save_artifact``, from a local
    folder or an object-store URI (e.g. a registered version's ``artifact_uri``)."""
    # a URI: a node-local copy, downloaded once per node (artifacts never change)
    d = Path(storage.local_copy(str(directory))) if storage.is_uri(str(directory)) else Path(directory)
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{directory}: not a model artifact ({name} is missing)")
    config = json.loads((d / CONFIG_FILE).read_text())
    # Artifacts written before titles and recency weighting existed: rebuild them as they were.
    config.setdefault("title_buckets", 0)
    config.setdefault("recency", False)
    config.setdefault("uniform_negatives", 0)
    config.setdefault("inputs", None)
    vocab = ItemVocab.from_dict(json.loads((d / VOCAB_FILE).read_text()))
    model = TwoTowerModel(**config)
    state = torch.load(d / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return model, vocab


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
