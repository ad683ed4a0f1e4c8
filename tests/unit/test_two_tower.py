import json

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, load_artifact, load_input_spec, save_artifact
from aiplatform.training.config import TrainConfig
from apps.shop.features import recommender_user

SPEC = UserInputSpec.from_service(recommender_user)
N_DENSE = SPEC.n_dense
HISTORY_LEN = SPEC.history_len


@pytest.fixture()
def items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": ["i3", "i1", "i2", "i4", "i1"],  # unsorted, with a duplicate id
            "title": ["c", "a", "b", None, "dup"],
            "category": ["shoes", "books", None, "shoes", "ignored"],
            "price": [30.0, 10.0, np.nan, 5.0, 99.0],
        }
    )


def _model(vocab: ItemVocab, **kw) -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel(**vocab.model_kwargs(), dim=kw.pop("dim", 16), inputs=kw.pop("inputs", SPEC), **kw)


def test_vocab_indices_unknown_and_round_trip(items):
    vocab = ItemVocab.from_items(items)
    assert vocab.item_ids == ["i1", "i2", "i3", "i4"]  # first row of a duplicate wins, sorted
    assert vocab.index("i1") == 1 and vocab.index("i4") == 4
    assert vocab.index("nope") == 0
    assert vocab.indices(["i2", "x", "i3"]).tolist() == [2, 0, 3]
    assert vocab.indices([]).dtype == np.int64
    # category: books=1, shoes=2, missing=0; the duplicate's "ignored" category is not used
    assert vocab.categories == ["books", "shoes"]
    assert vocab.item_category == [0, 1, 0, 2, 2]
    assert len(vocab.item_price_bucket) == vocab.n_items + 1
    assert vocab.item_price_bucket[2] == 0  # missing price -> unknown bucket
    # cheaper items never land in a higher bucket
    assert vocab.item_price_bucket[4] <= vocab.item_price_bucket[1] <= vocab.item_price_bucket[3]

    restored = ItemVocab.from_dict(json.loads(json.dumps(vocab.to_dict())))
    assert restored == vocab
    assert restored.indices(["i4", "zz"]).tolist() == [4, 0]


def test_vocab_from_dict_rejects_inconsistent_lengths(items):
    d = ItemVocab.from_items(items).to_dict()
    d["item_category"] = d["item_category"][:-1]
    with pytest.raises(ValueError, match="n_items"):
        ItemVocab.from_dict(d)


def test_encode_users_pads_truncates_and_logs_counts(items):
    vocab = ItemVocab.from_items(items)
    long_history = ["i1", "i2", "i3", "i4"] * 10  # 40 items, most recent first
    counts = np.zeros((4, N_DENSE), dtype="float32")
    counts[0, 0] = np.e - 1
    counts[1, 1] = np.nan
    counts[2, 2] = -(np.e - 1)
    hist, dense = vocab.encode_users([["i2", "ghost", "i4"], [], None, long_history], counts, HISTORY_LEN)

    assert hist.dtype == torch.long and hist.shape == (4, HISTORY_LEN)
    assert hist[0, :2].tolist() == [2, 4] and hist[0, 2:].eq(0).all()  # unknown dropped, then 0-padded
    assert hist[1].eq(0).all() and hist[2].eq(0).all()
    assert hist[3].tolist() == [1, 2, 3, 4] * 5  # the first HISTORY_LEN (most recent) are kept

    assert dense.dtype == torch.float32 and dense.shape == (4, N_DENSE)
    assert dense[0, 0].item() == pytest.approx(1.0)
    assert dense[1, 1].item() == 0.0  # NaN -> 0
    assert dense[2, 2].item() == pytest.approx(-1.0)  # a signed log: negatives keep their order

    with pytest.raises(ValueError, match="dense rows"):
        vocab.encode_users([["i1"]], np.zeros((2, 3)), HISTORY_LEN)
    # the model refuses a dense vector of another width, naming the features it expects
    with pytest.raises(ValueError, match="purchase_share_7d"):
        _model(vocab).user_embedding(hist, torch.zeros(4, 3))


def test_embeddings_are_normalised_and_padding_history_is_safe(items):
    vocab = ItemVocab.from_items(items)
    model = _model(vocab)
    hist, dense = vocab.encode_users([[], ["i1"]], np.zeros((2, N_DENSE)), HISTORY_LEN)
    u = model.user_embedding(hist, dense)
    v = model.item_embedding(torch.arange(vocab.n_items + 1))
    assert torch.isfinite(u).all()
    assert torch.allclose(u.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.allclose(v.norm(dim=1), torch.ones(vocab.n_items + 1), atol=1e-5)
    # history is mean-pooled over real items only: padding length does not change the result
    h1 = torch.zeros(1, HISTORY_LEN, dtype=torch.long)
    h1[0, 0] = 3
    h2 = h1.clone()
    h2[0, 1] = 3
    d = torch.zeros(1, N_DENSE)
    assert torch.allclose(model.user_embedding(h1, d), model.user_embedding(h2, d), atol=1e-6)


def _toy_batch(n_users: int = 64, n_items: int = 40, n_cats: int = 4, seed: int = 0):
    """Users whose history and target are in the same category."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": [f"it{i:03d}" for i in range(n_items)],
            "category": [f"c{i % n_cats}" for i in range(n_items)],
            "price": rng.uniform(1, 100, n_items),
        }
    )
    vocab = ItemVocab.from_items(items)
    by_cat = {c: items.loc[items["category"] == c, "item_id"].tolist() for c in items["category"].unique()}
    cats = rng.choice(sorted(by_cat), size=n_users)
    hists = [list(rng.choice(by_cat[c], size=5)) for c in cats]
    targets = [rng.choice(by_cat[c]) for c in cats]
    hist, dense = vocab.encode_users(hists, rng.poisson(2, (n_users, N_DENSE)), HISTORY_LEN)
    return vocab, hist, dense, torch.from_numpy(vocab.indices(targets))


def test_loss_decreases_on_a_toy_batch():
    vocab, hist, dense, target = _toy_batch()
    model = _model(vocab, dim=16, temperature=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = model.loss(hist, dense, target).item()
    for _ in range(60):
        loss = model.loss(hist, dense, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = model.loss(hist, dense, target).item()
    assert np.isfinite(first) and last < 0.5 * first
    assert model(hist, dense, target).item() == pytest.approx(last)  # forward is the loss (for DDP)


def test_duplicate_positives_are_not_negatives(items):
    vocab = ItemVocab.from_items(items)
    model = _model(vocab, temperature=0.05)
    hist = torch.zeros(3, HISTORY_LEN, dtype=torch.long)
    hist[:, 0] = torch.tensor([1, 2, 3])
    dense = torch.zeros(3, N_DENSE)
    # Rows 0 and 1 share the positive item 4; only row 2's item 2 is a true negative for them.
    target = torch.tensor([4, 4, 2])
    got = model.loss(hist, dense, target)

    u = model.user_embedding(hist, dense)
    v = model.item_embedding(target)
    logits = (u @ v.T) / 0.05
    expected = torch.stack(
        [
            -torch.log_softmax(logits[0, [0, 2]], 0)[0],  # row 0: positive col 0, negative col 2
            -torch.log_softmax(logits[1, [1, 2]], 0)[0],  # row 1: positive col 1, negative col 2
            -torch.log_softmax(logits[2], 0)[2],  # row 2: every other column is a negative
        ]
    ).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)

    # Without masking the duplicate would count as a negative and the loss would differ.
    unmasked = torch.nn.functional.cross_entropy(logits, torch.arange(3))
    assert abs(unmasked.item() - got.item()) > 1e-4


def test_all_duplicates_batch_has_finite_zero_loss(items):
    vocab = ItemVocab.from_items(items)
    model = _model(vocab)
    hist = torch.zeros(4, HISTORY_LEN, dtype=torch.long)
    loss = model.loss(hist, torch.zeros(4, N_DENSE), torch.tensor([3, 3, 3, 3]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(0.0, abs=1e-6)


def test_save_load_artifact_gives_identical_embeddings(items, tmp_path):
    vocab = ItemVocab.from_items(items)
    model = _model(vocab, dim=8, temperature=0.2)
    with torch.no_grad():  # move away from the seeded init so a fresh model would differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_artifact(model, vocab, str(tmp_path / "a"), extra={"epoch": 3})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "extra.json", "model.pt", "model_config.json", "user_tower.npz", "vocab.json"
    ]
    loaded, loaded_vocab = load_artifact(str(tmp_path / "a"))
    assert not loaded.training
    assert loaded_vocab == vocab
    assert loaded.config() == model.config()
    # the input contract travels in the model config: the loaded model reads the same columns
    assert loaded.inputs == SPEC and load_input_spec(str(tmp_path / "a")) == SPEC
    assert loaded.config()["n_dense"] == SPEC.n_dense and loaded.history_len == SPEC.history_len
    assert json.loads((tmp_path / "a" / "extra.json").read_text()) == {"epoch": 3}

    model.eval()
    hist, dense = vocab.encode_users([["i1", "i3"], []], np.ones((2, N_DENSE)), HISTORY_LEN)
    idx = torch.arange(vocab.n_items + 1)
    with torch.no_grad():
        assert torch.equal(model.item_embedding(idx), loaded.item_embedding(idx))
        assert torch.equal(model.user_embedding(hist, dense), loaded.user_embedding(hist, dense))


def test_artifact_in_an_object_store_saves_loads_and_is_cached_per_node(items, s3_root, tmp_path, monkeypatch):
    """A URI artifact (an S3-compatible server): written object by object, loaded from one
    node-local download (sub-folders such as the candidate ranker's included)."""
    from aiplatform.core import storage
    from aiplatform.models.candidates import candidates_dir_of
    from aiplatform.models.two_tower import load_vocab, read_extra

    monkeypatch.setenv("AIPLATFORM_CACHE_DIR", str(tmp_path / "cache"))
    vocab = ItemVocab.from_items(items)
    model = _model(vocab, dim=8)
    uri = f"{s3_root}/models/two_tower/1"
    save_artifact(model, vocab, uri, extra={"epoch": 2})
    assert candidates_dir_of(uri) is None
    storage.write_json(f"{uri}/candidates/candidates.json", {"format": 1})
    assert read_extra(uri) == {"epoch": 2} and read_extra(f"{s3_root}/missing") == {}
    assert load_vocab(uri) == vocab

    loaded, loaded_vocab = load_artifact(uri)
    assert loaded_vocab == vocab and loaded.config() == model.config()
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and (cached[0] / "candidates" / "candidates.json").is_file()
    storage.delete_file(f"{uri}/model.pt")  # artifacts never change: the node's copy is used
    assert load_artifact(uri)[0].config() == model.config()
    assert candidates_dir_of(uri) == f"{uri}/candidates"
    with pytest.raises(FileNotFoundError, match="two_tower/2: no such folder"):
        load_artifact(f"{s3_root}/models/two_tower/2")


def test_load_artifact_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        load_artifact(str(tmp_path))


def test_an_artifact_without_an_input_spec_is_refused_by_name(items, tmp_path):
    """A bare model (no spec: what artifacts trained before the input contract look like) still
    loads, but asking for its inputs is a clear error that says to retrain, never a guess."""
    vocab = ItemVocab.from_items(items)
    bare = TwoTowerModel(**vocab.model_kwargs(), dim=8)
    assert bare.inputs is None and bare.config()["n_dense"] == 12
    save_artifact(bare, vocab, str(tmp_path / "old"))
    assert load_artifact(str(tmp_path / "old"))[0].inputs is None
    with pytest.raises(ConfigError, match="retrain"):
        load_input_spec(str(tmp_path / "old"))
    with pytest.raises(ValueError, match="disagrees"):
        TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=SPEC, n_dense=12)


def test_train_config_validation_names_field(tmp_path):
    cfg = TrainConfig()
    assert cfg.num_workers == 2 and cfg.use_gpu is None and cfg.min_event_type == "view"
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=1)
    with pytest.raises(ConfigError, match="min_event_type"):
        TrainConfig(min_event_type="like")
    with pytest.raises(ConfigError, match="epcohs"):
        TrainConfig.from_dict({"epcohs": 3})

    good = tmp_path / "train.yaml"
    good.write_text("train:\n  epochs: 5\n  lr: 0.01\n  min_event_type: click\n")
    loaded = TrainConfig.from_yaml(good)
    assert (loaded.epochs, loaded.lr, loaded.min_event_type) == (5, 0.01, "click")
    bad = tmp_path / "bad.yaml"
    bad.write_text("temperature: -1\n")
    with pytest.raises(ConfigError, match="temperature"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_example_encoder_filters_targets_and_encodes(items):
    from aiplatform.training.train import ExampleEncoder

    vocab = ItemVocab.from_items(items)
    batch = {
        "user_id": np.array(["u1", "u1", "u2", "u3"], dtype=object),
        "item_id": np.array(["i1", "i2", "gone", "i3"], dtype=object),
        "event_type": np.array(["view", "purchase", "purchase", "wishlist"], dtype=object),
        "last_items": np.array([np.array([]), np.array(["i1"]), np.array(["i2"]), np.array(["i4", "i1"])],
                               dtype=object),
        "purchased_items": np.array([np.array([])] * 4, dtype=object),
        **{c: np.full(4, 1.0, dtype="float32") for c in SPEC.dense},
    }
    every = ExampleEncoder(vocab, SPEC, "view")(batch)
    # the unknown target item is dropped; an unknown event type counts as a view
    assert every["item"].tolist() == [1, 2, 3]
    assert every["hist"].shape == (3, HISTORY_LEN) and every["hist"][2, :2].tolist() == [4, 1]
    assert every["dense"].shape == (3, N_DENSE) and every["dense"].dtype == np.float32
    assert every["dense"][0].tolist() == pytest.approx([np.log(2.0)] * N_DENSE)  # log1p of each raw value
    purchases = ExampleEncoder(vocab, SPEC, "purchase")(batch)
    assert purchases["item"].tolist() == [2]
    assert purchases["hist"][0, 0] == 1
    with pytest.raises(ValueError, match="last_items"):
        ExampleEncoder(vocab, SPEC)({k: v for k, v in batch.items() if k != "last_items"})
    with pytest.raises(ValueError, match="purchase_share_7d"):  # a dense feature of the service
        ExampleEncoder(vocab, SPEC)({k: v for k, v in batch.items() if k != "purchase_share_7d"})


def test_logq_correction_changes_the_loss_and_checks_its_input():
    """With frequencies set, popular targets are discounted: the loss differs from the
    uncorrected one on the same batch, and a wrong-length vector is refused."""
    import numpy as np
    import pytest
    import torch

    from aiplatform.models.two_tower import TwoTowerModel

    n_items = 6
    model = TwoTowerModel(n_items=n_items, n_categories=2, n_price_buckets=2,
                          item_category=[0, 1, 1, 1, 2, 2, 2], item_price_bucket=[0, 1, 2, 1, 2, 1, 2], dim=8)
    torch.manual_seed(0)
    hist = torch.randint(1, n_items + 1, (5, 20))
    dense = torch.rand(5, 12)
    items = torch.tensor([1, 2, 3, 4, 5])
    plain = float(model.loss(hist, dense, items))
    model.set_item_frequencies(np.array([0, 1000, 1, 1, 1, 1, 1]))
    corrected = float(model.loss(hist, dense, items))
    assert corrected != pytest.approx(plain)
    assert torch.isfinite(model.log_q).all()
    with pytest.raises(ValueError, match="counts"):
        model.set_item_frequencies(np.ones(3))


def test_title_hashing_is_stable_lowercased_and_bounded():
    from aiplatform.models.two_tower import hash_title

    a = hash_title("Eco Shoe 12", 64)
    assert a == hash_title("eco  SHOE 12", 64)  # case and spacing do not matter
    assert len(a) == 3 and all(1 <= t <= 64 for t in a)
    assert hash_title("shoe shoe shoe", 64) == hash_title("shoe", 64)  # distinct words only
    assert hash_title(None, 64) == [] and hash_title(float("nan"), 64) == [] and hash_title(pd.NA, 64) == []
    assert hash_title("anything", 0) == []
    assert len(hash_title(" ".join(f"w{i}" for i in range(30)), 10_000)) == 8  # capped
    # crc32, not the per-process salted hash(): the same bucket in every process, every run
    import zlib
    assert hash_title("eco", 1000) == [1 + zlib.crc32(b"eco") % 1000]


def test_vocab_title_tokens_round_trip_and_old_vocab_loads(items):
    vocab = ItemVocab.from_items(items, title_buckets=32)
    assert vocab.title_buckets == 32 and len(vocab.item_title_tokens) == vocab.n_items + 1
    assert vocab.item_title_tokens[0] == [] and vocab.item_title_tokens[4] == []  # padding; i4 has no title
    assert vocab.item_title_tokens[1] == vocab.item_title_tokens[1][:1] != []  # "a": one word
    matrix = vocab.title_token_matrix()
    assert matrix.shape == (vocab.n_items + 1, 8) and matrix[4].tolist() == [0] * 8
    assert ItemVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    old = vocab.to_dict()
    del old["title_buckets"], old["item_title_tokens"]
    legacy = ItemVocab.from_dict(old)
    assert legacy.title_buckets == 0 and "title_buckets" not in legacy.model_kwargs()
    off = ItemVocab.from_items(items, title_buckets=0)
    assert off.item_title_tokens == [[]] * (off.n_items + 1)
    with pytest.raises(ValueError, match="title_buckets"):
        ItemVocab.from_items(items, title_buckets=-1)


def test_item_tower_uses_titles_and_old_artifacts_still_load(items, tmp_path):
    vocab = ItemVocab.from_items(items, title_buckets=32)
    model = _model(vocab, dim=8)
    assert model.config()["title_buckets"] == 32 and "item_title_tokens" not in model.config()
    idx = torch.arange(vocab.n_items + 1)
    with torch.no_grad():
        before = model.item_embedding(idx)
        model.item_title[2, 0] = (model.item_title[2, 0] % 32) + 1  # another word for item 2
        after = model.item_embedding(idx)
    assert not torch.allclose(before[2], after[2]) and torch.allclose(before[1], after[1])
    # the token table travels in the state_dict: a reloaded model has the edited title
    save_artifact(model, vocab, str(tmp_path / "t"))
    loaded, _ = load_artifact(str(tmp_path / "t"))
    assert torch.equal(loaded.item_title, model.item_title)
    assert torch.allclose(loaded.item_embedding(idx), after, atol=1e-6)

    # an artifact written before titles/recency existed (config without those keys) loads as it was
    plain_vocab = ItemVocab.from_items(items, title_buckets=0)
    plain = _model(plain_vocab, dim=8)
    save_artifact(plain, plain_vocab, str(tmp_path / "old"))
    cfg_path = tmp_path / "old" / "model_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("title_buckets", "title_len", "recency"):
        cfg.pop(key)
    cfg_path.write_text(json.dumps(cfg))
    old, _ = load_artifact(str(tmp_path / "old"))
    assert old.config()["title_buckets"] == 0 and not old.config()["recency"]
    assert torch.equal(old.item_embedding(idx), plain.item_embedding(idx))


def test_recency_weighting_favours_recent_history(items):
    vocab = ItemVocab.from_items(items)
    model = _model(vocab, dim=8, recency=True)
    d = torch.zeros(2, N_DENSE)
    h = torch.zeros(2, HISTORY_LEN, dtype=torch.long)
    h[0, :2] = torch.tensor([1, 3])  # i1 most recent
    h[1, :2] = torch.tensor([3, 1])  # i3 most recent
    with torch.no_grad():
        u = model.user_embedding(h, d)
        ref = model.user_embedding(torch.tensor([[1] + [0] * (HISTORY_LEN - 1)]), d[:1])
    assert not torch.allclose(u[0], u[1])  # order matters with recency weights
    assert (u[0] @ ref[0]) > (u[1] @ ref[0])  # closer to the item seen last
    assert "pos_logit" in dict(model.named_parameters())


def test_uniform_negatives_only_in_training_and_never_the_positive():
    kw = dict(n_items=3, n_categories=1, n_price_buckets=1, item_category=[0, 1, 1, 1],
              item_price_bucket=[0, 1, 1, 1], dim=8, inputs=SPEC)
    torch.manual_seed(0)
    plain = TwoTowerModel(**kw)
    torch.manual_seed(0)
    mixed = TwoTowerModel(**kw, uniform_negatives=64)
    hist = torch.tensor([[1] + [0] * (HISTORY_LEN - 1), [2] + [0] * (HISTORY_LEN - 1)])
    dense = torch.zeros(2, N_DENSE)
    target = torch.tensor([3, 3])  # one positive item, so in-batch there is no negative at all
    assert plain.loss(hist, dense, target).item() == pytest.approx(0.0, abs=1e-6)
    # the uniform draws bring negatives (items 1 and 2); draws of item 3 itself are masked
    torch.manual_seed(1)
    assert mixed.loss(hist, dense, target).item() > 0.1
    mixed.eval()  # evaluation losses stay comparable with the in-batch one
    assert mixed.loss(hist, dense, target).item() == pytest.approx(0.0, abs=1e-6)
    assert mixed.config()["uniform_negatives"] == 64
