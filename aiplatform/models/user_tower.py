"""The two-tower model's user tower as numpy arrays: what a serving replica runs.

Why not torch: a replica that imports torch spends ~1.7 s of its cold start on the import alone
(a third of the 5 s a replica scaled from zero may take to answer), and the user tower is a
mean of embedding rows and three small matrix products: numpy does it in microseconds for a
request-sized batch. ``save_artifact`` writes the tower's weights next to the state dict
(``user_tower.npz``); an artifact written before that is converted from its state dict, which
imports torch once, as before.

``UserTower.embed`` equals ``TwoTowerModel.user_embedding`` (tests/unit/test_user_tower.py
checks both on random models, with and without recency weighting).
"""

import io
import json
from typing import Any

import numpy as np

from aiplatform.core import storage

USER_TOWER_FILE = "user_tower.npz"
"""The user tower's arrays in an artifact folder (``save_artifact``)."""

_ARRAYS = ("item_emb", "cat_emb", "item_category", "dense_w", "dense_b", "w1", "b1", "w2", "b2")


class UserTower:
    """[B, dim] L2-normalised query vectors from encoded histories and dense inputs
    (``ItemVocab.encode_user_arrays``), in float32 like the torch tower."""

    def __init__(self, arrays: dict[str, np.ndarray], history_len: int, n_dense: int) -> None:
        missing = [name for name in _ARRAYS if name not in arrays]
        if missing:
            raise ValueError(f"user tower: arrays {missing} are missing")
        self.history_len, self.n_dense = int(history_len), int(n_dense)
        f32 = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items() if k != "item_category"}
        self.item_emb, self.cat_emb = f32["item_emb"], f32["cat_emb"]
        self.item_category = np.asarray(arrays["item_category"], dtype=np.int64)
        self.dense_w, self.dense_b = f32["dense_w"].T.copy(), f32["dense_b"]
        self.w1, self.b1, self.w2, self.b2 = f32["w1"].T.copy(), f32["b1"], f32["w2"].T.copy(), f32["b2"]
        self.position_weight = np.exp(f32["pos_logit"]) if "pos_logit" in f32 else None
        self.dim = int(self.w2.shape[1])

    def embed(self, hist: np.ndarray, dense: np.ndarray) -> np.ndarray:
        """The tower's forward pass: the mean of the history items' [item ‖ category] vectors
        (padding masked, optionally weighted per position), next to the dense MLP's output,
        through the user MLP, L2-normalised."""
        hist = np.asarray(hist, dtype=np.int64)
        dense = np.asarray(dense, dtype=np.float32)
        if dense.shape[-1] != self.n_dense:
            raise ValueError(f"dense inputs: expected {self.n_dense} features, got {dense.shape[-1]}")
        mask = (hist > 0).astype(np.float32)[..., None]  # [B, L, 1]
        if self.position_weight is not None:
            mask = mask * self.position_weight[: hist.shape[1]].reshape(1, -1, 1)
        feats = np.concatenate([self.item_emb[hist], self.cat_emb[self.item_category[hist]]], axis=-1)
        pooled = (feats * mask).sum(1) / np.maximum(mask.sum(1), 1e-6)
        x = np.concatenate([pooled, np.maximum(dense @ self.dense_w + self.dense_b, 0)], axis=-1)
        out = np.maximum(x @ self.w1 + self.b1, 0) @ self.w2 + self.b2
        norm = np.maximum(np.linalg.norm(out, axis=-1, keepdims=True), 1e-12)  # F.normalize's eps
        return (out / norm).astype(np.float32)


def tower_arrays(state: dict[str, Any], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """The user tower's arrays from a ``TwoTowerModel`` state dict (tensors or arrays) and its
    config: the same names ``UserTower`` reads."""
    def arr(key: str) -> np.ndarray:
        value = state[key]
        return np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)

    arrays = {"item_emb": arr("item_emb.weight"), "cat_emb": arr("cat_emb.weight"),
              "item_category": np.asarray(config["item_category"], dtype=np.int64),
              "dense_w": arr("dense_mlp.0.weight"), "dense_b": arr("dense_mlp.0.bias"),
              "w1": arr("user_mlp.0.weight"), "b1": arr("user_mlp.0.bias"),
              "w2": arr("user_mlp.2.weight"), "b2": arr("user_mlp.2.bias")}
    if config.get("recency"):
        arrays["pos_logit"] = arr("pos_logit")
    return arrays


def tower_bytes(arrays: dict[str, np.ndarray], config: dict[str, Any]) -> bytes:
    """``arrays`` and the sizes the tower needs, as the bytes of ``user_tower.npz``."""
    buf = io.BytesIO()
    sizes = {"history_len": int(config["history_len"]), "n_dense": int(config["n_dense"])}
    np.savez(buf, sizes=np.frombuffer(json.dumps(sizes).encode(), dtype=np.uint8), **arrays)
    return buf.getvalue()


def load_user_tower(directory: str) -> UserTower:
    """The user tower of an artifact (local folder or URI): its ``user_tower.npz``, or, for an
    artifact written before those existed, converted from ``model.pt`` (which imports torch)."""
    data = storage.read_bytes(storage.join(str(directory), USER_TOWER_FILE))
    if data is None:
        from aiplatform.models.two_tower import load_artifact  # an older artifact: torch, once

        model, _ = load_artifact(directory)
        config = model.config()
        return UserTower(tower_arrays(model.state_dict(), config), config["history_len"], config["n_dense"])
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    sizes = json.loads(arrays.pop("sizes").tobytes().decode())
    return UserTower(arrays, sizes["history_len"], sizes["n_dense"])
