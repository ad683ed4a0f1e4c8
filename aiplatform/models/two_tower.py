"""Two-tower retrieval model: a user tower and an item tower that meet in one vector space.

The item tower's output is what the vector index stores; the user tower's output is the query.
Both are L2-normalised, so a dot product is a cosine similarity and the index can use it as is.

This module is torch only (no Ray): training, evaluation and the index builder load the same
artifact with ``load_artifact``. Serving loads only its torch-free parts: ``models.artifact``
(vocabulary, input spec; re-exported here) and the user tower's weights as numpy arrays
(``models.user_tower``, written next to the state dict by ``save_artifact``). An artifact is a
folder, local or in the object store (``s3://…/models/two_tower/3``): a URI is downloaded once
per node (``storage.local_copy``; registered artifacts never change) and loaded from there.
"""

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiplatform.core import storage
from aiplatform.models.artifact import (  # noqa: F401  (re-exported: training imports them from here)
    CONFIG_FILE,
    DEFAULT_PRICE_BUCKETS,
    DEFAULT_TITLE_BUCKETS,
    EXTRA_FILE,
    MODEL_FILE,
    TITLE_TOKENS,
    UNKNOWN_CATEGORY,
    VOCAB_FILE,
    ItemVocab,
    hash_title,
    load_input_spec,
    load_vocab,
    read_extra,
)
from aiplatform.models.inputs import UserInputSpec, input_sizes
from aiplatform.models.user_tower import USER_TOWER_FILE, tower_arrays, tower_bytes

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

    ``model.pt`` (CPU state_dict), ``model_config.json`` (constructor kwargs), ``vocab.json``,
    ``user_tower.npz`` (the user tower for serving, ``models.user_tower``) and, if given,
    ``extra.json`` (metrics, params, lineage: anything JSON). ``directory`` may
    be a local folder or an object-store URI.
    """
    model = getattr(model, "module", model)  # accept a DDP-wrapped model
    directory = str(directory)
    storage.make_dirs(directory)
    state = {k: t.detach().cpu() for k, t in model.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    storage.write_bytes(storage.join(directory, MODEL_FILE), buf.getvalue())
    config = model.config()
    storage.write_json(storage.join(directory, CONFIG_FILE), config)
    # serving's copy of the user tower: numpy arrays, so a replica never imports torch
    storage.write_bytes(storage.join(directory, USER_TOWER_FILE), tower_bytes(tower_arrays(state, config), config))
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






