"""Ranking model: scores a short list of retrieved candidates for one user, with features the
two-tower model cannot use.

Retrieval has to score the whole catalogue with one dot product, so it sees the user and the
item only through two separate vectors. The ranker sees a few hundred candidates at most and
can afford *cross* features between the user's recent history and each candidate:

- user: the dense features of the model's input spec (``models.inputs``, scaled like the
  two-tower's), and the mean of the history's item/category embeddings;
- item: id, category and price-bucket embeddings, and the numeric features of the item
  popularity view (``item_features``: scaled by the same signed ``log1p``; a table frozen into
  the artifact at training time, point-in-time at the training cutoff; zeros when none was given);
- cross: how many of the user's recent items share the candidate's category (count and any),
  how recently (``1 / (1 + position)`` of the most recent one, position 0 = the last item),
  whether the candidate itself is among the recent items and how recently, the history length,
  the elementwise product of the pooled history and the item embedding, and the two-tower score
  of (user, item) when the retrieval model is available (``use_retrieval_score``).

Recency is measured in *positions* of the history (most recent first), not in seconds: the
history feature (a ``last_n`` aggregation) keeps the order of the last items but not their
timestamps, and the same row is what serving reads from the online store.

All cross features are computed inside ``forward`` from index tensors, so training, offline
evaluation and serving cannot compute them differently.

Graded relevance (``LABEL_GAINS``): purchase 3 > add_to_cart 2 > click 1 > view 0.5; sampled
negatives are 0. Views get a small positive gain rather than 0: they are the bulk of the data
and still say "this was shown and looked at", but a purchase outweighs six of them.

Artifact: a directory with ``ranker.pt`` (CPU state_dict) and ``ranker_config.json``; the item
vocabulary is the two-tower artifact's (the ranker lives in ``<two-tower artifact>/ranker/``).
Like the two-tower artifact, it may be a local folder or an object-store URI.

``rerank`` (scoring candidate lists) lives here, in the models layer, because serving runs it:
serving imports no training code.
"""

import io
import json
from pathlib import Path

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aiplatform.core import storage
from aiplatform.core.errors import UserInputError
from aiplatform.models.inputs import UserInputSpec, encode_dense, input_sizes
from aiplatform.models.two_tower import ItemVocab

RANKER_FILE = "ranker.pt"
RANKER_CONFIG_FILE = "ranker_config.json"
RANKER_SUBDIR = "ranker"
"""Where a ranker lives inside a two-tower artifact directory (one registry version holds both)."""

LABEL_GAINS: dict[str, float] = {"view": 0.5, "click": 1.0, "add_to_cart": 2.0, "purchase": 3.0}
"""Gain of a positive by event type; unknown types count as views (docs/architecture.md); negatives are 0."""

N_CROSS = 7
"""cat_count, cat_any, cat_recency, in_recent, item_recency, history_length, retrieval_score."""


class RankerModel(nn.Module):
    """An MLP over user, item and cross features -> one relevance score per (user, candidate)."""

    def __init__(
        self,
        n_items: int,
        n_categories: int,
        n_price_buckets: int,
        item_category: list[int],
        item_price_bucket: list[int],
        dim: int = 32,
        hidden: int = 128,
        n_dense: int | None = None,
        history_len: int | None = None,
        use_retrieval_score: bool = False,
        dropout: float = 0.0,
        inputs: "UserInputSpec | dict | None" = None,
        item_features: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if len(item_category) != n_items + 1 or len(item_price_bucket) != n_items + 1:
            raise ValueError("item_category and item_price_bucket need n_items + 1 entries (index 0 = padding)")
        spec = UserInputSpec.from_dict(inputs) if isinstance(inputs, dict) else inputs
        n_dense, history_len = input_sizes(spec, n_dense, history_len)
        # Old artifacts (no item_features): their item table had one column per user dense feature.
        item_features = list(item_features) if item_features is not None else [f"item_{j}" for j in range(n_dense)]
        self.inputs: UserInputSpec | None = spec
        self.item_features: list[str] = item_features
        self.history_len = history_len
        self._config = {
            "n_items": int(n_items),
            "n_categories": int(n_categories),
            "n_price_buckets": int(n_price_buckets),
            "item_category": [int(x) for x in item_category],
            "item_price_bucket": [int(x) for x in item_price_bucket],
            "dim": int(dim),
            "hidden": int(hidden),
            "n_dense": int(n_dense),
            "history_len": int(history_len),
            "use_retrieval_score": bool(use_retrieval_score),
            "dropout": float(dropout),
            "inputs": spec.to_dict() if spec is not None else None,
            "item_features": list(item_features),
        }
        self.use_retrieval_score = bool(use_retrieval_score)
        cat_dim, price_dim = max(4, dim // 2), max(4, dim // 4)
        self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.cat_emb = nn.Embedding(n_categories + 1, cat_dim, padding_idx=0)
        self.price_emb = nn.Embedding(n_price_buckets + 1, price_dim, padding_idx=0)
        for emb in (self.item_emb, self.cat_emb, self.price_emb):
            nn.init.normal_(emb.weight, std=0.05)
            with torch.no_grad():
                emb.weight[0].zero_()
        self.register_buffer("item_category", torch.tensor(item_category, dtype=torch.long), persistent=False)
        self.register_buffer("item_price_bucket", torch.tensor(item_price_bucket, dtype=torch.long), persistent=False)
        # scaled item features per item index (frozen at training time); part of the
        # state_dict so the artifact carries it to serving.
        n_item = len(item_features)
        self.register_buffer("item_counts", torch.zeros(n_items + 1, n_item))
        d_item = dim + cat_dim
        d_in = n_dense + d_item + d_item + price_dim + n_item + d_item + N_CROSS
        self.mlp = nn.Sequential(
            nn.Linear(d_in, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2), nn.ReLU(),
            nn.Linear(hidden // 2, 1),
        )

    def config(self) -> dict:
        """Constructor kwargs (JSON-serialisable): ``RankerModel(**m.config())`` rebuilds it."""
        return json.loads(json.dumps(self._config))

    @classmethod
    def from_vocab(cls, vocab: ItemVocab, **kwargs) -> "RankerModel":
        vk = vocab.model_kwargs()  # may carry more than the ranker uses (other encoders' keys)
        keys = ("n_items", "n_categories", "n_price_buckets", "item_category", "item_price_bucket")
        return cls(**{k: vk[k] for k in keys}, **kwargs)

    def set_item_counts(self, counts: "np.ndarray") -> None:
        """Item features: [n_items + 1, len(item_features)] raw values (scaled here)."""
        arr = np.asarray(counts, dtype=np.float32)
        if arr.shape != tuple(self.item_counts.shape):
            raise ValueError(f"item features: expected shape {tuple(self.item_counts.shape)} "
                             f"({', '.join(self.item_features)}), got {arr.shape}")
        self.item_counts.copy_(torch.from_numpy(encode_dense(arr)))

    def _item_vec(self, idx: Tensor) -> Tensor:
        return torch.cat([self.item_emb(idx), self.cat_emb(self.item_category[idx])], dim=-1)

    def cross_features(self, hist: Tensor, cands: Tensor, retrieval_score: Tensor | None) -> Tensor:
        """[B, N, N_CROSS] features of each candidate against the user's recent items."""
        L = hist.shape[1]
        valid = (hist > 0).unsqueeze(1)  # [B, 1, L]
        inv_pos = 1.0 / (1.0 + torch.arange(L, device=hist.device, dtype=torch.float32))  # [L]
        cand_cat = self.item_category[cands]  # [B, N]
        hist_cat = self.item_category[hist]  # [B, L]
        same_cat = (cand_cat.unsqueeze(-1) == hist_cat.unsqueeze(1)) & valid & (cand_cat > 0).unsqueeze(-1)
        same_item = (cands.unsqueeze(-1) == hist.unsqueeze(1)) & valid & (cands > 0).unsqueeze(-1)
        same_cat_f, same_item_f = same_cat.float(), same_item.float()
        n_hist = valid.float().sum(-1).expand(-1, cands.shape[1])  # [B, N]
        feats = [
            same_cat_f.sum(-1) / max(L, 1),
            same_cat_f.amax(-1),
            (same_cat_f * inv_pos).amax(-1),
            same_item_f.amax(-1),
            (same_item_f * inv_pos).amax(-1),
            n_hist / max(L, 1),
        ]
        if retrieval_score is not None and self.use_retrieval_score:
            feats.append(retrieval_score.to(torch.float32))
        else:
            feats.append(torch.zeros_like(n_hist))
        return torch.stack(feats, dim=-1)

    def forward(self, hist: Tensor, dense: Tensor, cands: Tensor, retrieval_score: Tensor | None = None) -> Tensor:
        """Scores [B, N] of candidates ``cands`` [B, N] (item indices; 0 = padding, scored but
        meaningless) for users given by ``hist`` [B, L] and ``dense`` [B, n_dense] (log1p counts)."""
        hist, cands = hist.long(), cands.long()
        B, N = cands.shape
        mask = (hist > 0).unsqueeze(-1).float()
        pooled = (self._item_vec(hist) * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # [B, D]
        item_vec = self._item_vec(cands)  # [B, N, D]
        user_part = torch.cat([dense.float(), pooled], dim=-1).unsqueeze(1).expand(B, N, -1)
        x = torch.cat(
            [
                user_part,
                item_vec,
                self.price_emb(self.item_price_bucket[cands]),
                self.item_counts[cands],
                pooled.unsqueeze(1) * item_vec,
                self.cross_features(hist, cands, retrieval_score),
            ],
            dim=-1,
        )
        return self.mlp(x).squeeze(-1)


@torch.no_grad()
def rerank(
    model: RankerModel,
    vocab: ItemVocab,
    histories: Sequence[Sequence[str]],
    dense: np.ndarray,
    candidates: list[list[str]],
    retrieval_scores: list[list[float]] | None = None,
) -> list[np.ndarray]:
    """Ranker scores of each user's candidates, in one forward pass for the whole batch.

    ``histories[i]`` / ``dense[i]`` are user i's history items and raw dense values, read from
    the feature row through the model's ``UserInputSpec``; ``candidates[i]`` are user i's item
    ids (any length); ``retrieval_scores[i]`` their two-tower scores, if the ranker was trained
    with them. Returns one float32 array per user, aligned with its candidates; an item unknown
    to the vocabulary scores -inf.
    """
    if len(histories) != len(candidates):
        raise UserInputError(f"rerank: {len(histories)} users but {len(candidates)} candidate lists")
    if retrieval_scores is not None and len(retrieval_scores) != len(candidates):
        raise UserInputError("rerank: retrieval_scores needs one list per candidate list")
    lengths = [len(c) for c in candidates]
    if not candidates or max(lengths) == 0:
        return [np.zeros(n, np.float32) for n in lengths]
    width = max(lengths)
    cands = np.zeros((len(candidates), width), np.int64)
    rs = np.zeros((len(candidates), width), np.float32)
    for i, c in enumerate(candidates):
        cands[i, :len(c)] = vocab.indices(list(c))
        if retrieval_scores is not None:
            if len(retrieval_scores[i]) != len(c):
                raise UserInputError(f"rerank: user {i} has {len(c)} candidates but "
                                     f"{len(retrieval_scores[i])} retrieval scores")
            rs[i, :len(c)] = np.asarray(retrieval_scores[i], np.float32)
    dense = np.asarray(dense, np.float32).reshape(len(histories), -1)
    hist, dense_t = vocab.encode_users(histories, dense, model.history_len)
    model.eval()
    scores = model(hist, dense_t, torch.from_numpy(cands),
                   torch.from_numpy(rs) if retrieval_scores is not None else None).numpy()
    scores = np.where(cands > 0, scores, -np.inf).astype(np.float32)
    return [scores[i, :n] for i, n in enumerate(lengths)]


def listwise_loss(scores: Tensor, gains: Tensor, valid: Tensor | None = None) -> Tensor:
    """Softmax cross-entropy of each list against its gains normalised to a distribution.

    With one positive per list (column 0) and negatives at gain 0 this is the sampled softmax,
    each list weighted by its positive's gain, so a purchase counts six times a view.
    ``valid`` masks padded candidates out of the softmax.
    """
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    total = gains.sum(-1)
    keep = total > 0
    if not bool(keep.any()):
        return scores.sum() * 0.0
    target = gains[keep] / total[keep].unsqueeze(-1)
    logp = F.log_softmax(scores[keep], dim=-1)
    per_list = -(target * torch.where(target > 0, logp, torch.zeros_like(logp))).sum(-1)
    weight = total[keep]
    return (per_list * weight).sum() / weight.sum()


# ---- artifacts -----------------------------------------------------------------------------------
def save_ranker(model: RankerModel, directory: str, extra: dict | None = None) -> str:
    """Write ``ranker.pt`` + ``ranker_config.json`` (each atomically) into a local folder or
    an object-store URI; returns the directory."""
    model = getattr(model, "module", model)
    directory = str(directory)
    storage.make_dirs(directory)
    buf = io.BytesIO()
    torch.save({k: t.detach().cpu() for k, t in model.state_dict().items()}, buf)
    storage.write_bytes(storage.join(directory, RANKER_FILE), buf.getvalue())
    storage.write_json(storage.join(directory, RANKER_CONFIG_FILE), {"model": model.config(), "extra": extra or {}})
    return directory


def is_ranker_artifact(directory: str) -> bool:
    """Does ``directory`` (a local folder or a URI) hold a ranker? Two existence checks, no
    download: cheap enough for a driver deciding what to deploy."""
    directory = str(directory)
    if storage.is_uri(directory):
        return all(storage.exists(storage.join(directory, f)) for f in (RANKER_FILE, RANKER_CONFIG_FILE))
    d = Path(directory)
    return (d / RANKER_FILE).is_file() and (d / RANKER_CONFIG_FILE).is_file()


def load_ranker(directory: str) -> RankerModel:
    """The ranker (eval mode, CPU) saved by ``save_ranker``, from a local folder or a URI
    (downloaded once per node: registered artifacts never change)."""
    if not is_ranker_artifact(str(directory)):
        raise FileNotFoundError(
            f"{directory}: not a ranker artifact ({RANKER_FILE} and {RANKER_CONFIG_FILE} expected)")
    d = Path(storage.local_copy(str(directory))) if storage.is_uri(str(directory)) else Path(directory)
    config = json.loads((d / RANKER_CONFIG_FILE).read_text())["model"]
    config.setdefault("inputs", None)  # rankers saved before input specs
    model = RankerModel(**config)
    model.load_state_dict(torch.load(d / RANKER_FILE, map_location="cpu", weights_only=True))
    model.eval()
    return model


def read_ranker_extra(directory: str) -> dict:
    """The ``extra`` saved with a ranker (epoch, history), from a local folder or a URI."""
    data = storage.read_json(storage.join(str(directory), RANKER_CONFIG_FILE), {}) or {}
    return dict(data.get("extra") or {})


def ranker_dir_of(artifact_dir: str) -> str | None:
    """``<artifact_dir>/ranker`` (a path or a URI, as ``artifact_dir``) if that two-tower
    artifact carries a ranker, else None."""
    artifact_dir = str(artifact_dir)
    if storage.is_uri(artifact_dir):
        d = storage.join(artifact_dir, RANKER_SUBDIR)
        return d if is_ranker_artifact(d) else None
    d = Path(artifact_dir) / RANKER_SUBDIR
    return str(d) if is_ranker_artifact(str(d)) else None


__all__ = [
    "LABEL_GAINS",
    "RANKER_SUBDIR",
    "RankerModel",
    "is_ranker_artifact",
    "listwise_loss",
    "load_ranker",
    "ranker_dir_of",
    "read_ranker_extra",
    "rerank",
    "save_ranker",
]
