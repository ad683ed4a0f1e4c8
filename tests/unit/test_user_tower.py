"""The serving user tower (numpy, ``models.user_tower``) answers what the torch tower does, and
serving loads a version without importing torch."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.models.artifact import load_vocab
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, save_artifact
from aiplatform.models.user_tower import USER_TOWER_FILE, UserTower, load_user_tower, tower_arrays
from apps.shop.features import recommender_user

ROOT = Path(__file__).resolve().parents[2]
SPEC = UserInputSpec.from_service(recommender_user)


def _vocab(n: int = 40) -> ItemVocab:
    rng = np.random.default_rng(0)
    return ItemVocab.from_items(pd.DataFrame({
        "item_id": [f"i{j}" for j in range(n)], "title": [f"word{j % 7} thing" for j in range(n)],
        "category": [f"c{j % 5}" for j in range(n)], "price": rng.uniform(1, 100, n)}))


def _inputs(vocab: ItemVocab, users: int = 9) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    histories = [[f"i{j}" for j in rng.integers(0, vocab.n_items, rng.integers(0, 30))] for _ in range(users)]
    histories[0] = []  # an empty history: the pooled part is zeros
    histories[1] = ["ghost", "i3"]  # an unknown item is dropped
    dense = rng.poisson(3, (users, SPEC.n_dense)).astype(np.float64)
    return vocab.encode_user_arrays(histories, dense, SPEC.history_len)


@pytest.mark.parametrize("recency", [False, True])
def test_numpy_tower_equals_the_torch_tower(recency):
    vocab = _vocab()
    torch.manual_seed(3)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=SPEC, recency=recency).eval()
    if recency:  # away from its initial decay, so a wrong position weight would show
        with torch.no_grad():
            model.pos_logit.add_(torch.randn_like(model.pos_logit))
    hist, dense = _inputs(vocab)
    with torch.inference_mode():
        expected = model.user_embedding(torch.from_numpy(hist), torch.from_numpy(dense)).numpy()
    config = model.config()
    tower = UserTower(tower_arrays(model.state_dict(), config), config["history_len"], config["n_dense"])
    got = tower.embed(hist, dense)
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-6)


def test_saved_artifact_carries_the_tower_and_an_older_one_is_converted(tmp_path):
    vocab = _vocab()
    torch.manual_seed(4)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=SPEC).eval()
    save_artifact(model, vocab, str(tmp_path / "v1"))
    assert (tmp_path / "v1" / USER_TOWER_FILE).is_file()
    hist, dense = _inputs(load_vocab(str(tmp_path / "v1")))
    saved = load_user_tower(str(tmp_path / "v1")).embed(hist, dense)
    (tmp_path / "v1" / USER_TOWER_FILE).unlink()  # as written before user_tower.npz existed
    converted = load_user_tower(str(tmp_path / "v1")).embed(hist, dense)
    with torch.inference_mode():
        expected = model.user_embedding(torch.from_numpy(hist), torch.from_numpy(dense)).numpy()
    np.testing.assert_allclose(saved, expected, atol=2e-6)
    np.testing.assert_allclose(converted, expected, atol=2e-6)


def test_a_wrong_dense_width_names_the_inputs():
    vocab = _vocab()
    model = TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=SPEC)
    config = model.config()
    tower = UserTower(tower_arrays(model.state_dict(), config), config["history_len"], config["n_dense"])
    with pytest.raises(ValueError, match="dense inputs: expected"):
        tower.embed(np.zeros((1, SPEC.history_len), np.int64), np.zeros((1, SPEC.n_dense + 1), np.float32))


def test_serving_imports_no_torch():
    """What a replica imports to answer (the app module, the pipeline, the tower and vocabulary
    loaders) pulls in no torch: the import alone cost ~1.7 s of every replica's cold start."""
    code = ("import sys; import aiplatform.serving.app, aiplatform.serving.pipeline, aiplatform.models.user_tower, "
            "aiplatform.models.artifact; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
