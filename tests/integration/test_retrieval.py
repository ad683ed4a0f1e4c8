"""Item index: Ray Data embedding, one LanceDB table per model version, exact and HNSW search,
the measured recall recorded in the registry, upserts embedded with the version's model."""

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, load_artifact, save_artifact
from aiplatform.registry.registry import ModelRegistry
from aiplatform.retrieval import ItemIndex, build_item_index, persist, vector_table_name

pytestmark = pytest.mark.integration

N_ITEMS = 300


def make_items(n: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [f"item_{i:05d}" for i in range(n)],
            "title": [f"Item {i}" for i in range(n)],
            "category": [f"cat_{i % 9}" for i in range(n)],
            "price": np.linspace(1.0, 250.0, n),
        }
    )


def make_artifact(directory, items: pd.DataFrame, dim: int = 32, seed: int = 0) -> str:
    """An untrained but real model artifact: enough to test the plumbing end to end."""
    torch.manual_seed(seed)
    vocab = ItemVocab.from_items(items)
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=dim), vocab, str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def built(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    items = make_items(N_ITEMS)
    artifact = make_artifact(root / "artifact", items)
    vectors = str(root / "vectors")
    # one row the model has never seen, and one duplicate: neither may end up in the table twice
    extra = pd.DataFrame({"item_id": ["brand_new", "item_00000"], "category": ["x", "cat_0"],
                          "price": [1.0, 1.0]})
    name = build_item_index(vectors, "two_tower", 1, artifact, pd.concat([items, extra]),
                            batch_size=64)
    return {"vectors": vectors, "table": name, "artifact": artifact, "items": items}


def test_table_holds_the_model_item_vectors(built):
    assert built["table"] == vector_table_name("two_tower", 1) == "two_tower_v1"
    index = ItemIndex(built["vectors"], built["table"])
    assert len(index) == N_ITEMS  # unknown item dropped, duplicate kept once
    assert index.vector_of("brand_new") is None

    model, vocab = load_artifact(built["artifact"])
    ids = ["item_00000", "item_00123", "item_00299"]
    with torch.inference_mode():
        expected = model.item_embedding(torch.as_tensor(vocab.indices(ids))).numpy()
    got = np.stack([index.vector_of(i) for i in ids])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_search_ranks_the_query_item_first(built):
    index = ItemIndex(built["vectors"], built["table"])
    for item_id in ["item_00000", "item_00042", "item_00150", "item_00299"]:
        hits = index.search(index.vector_of(item_id), k=10)
        assert len(hits) == 10
        assert hits[0][0] == item_id
        assert hits[0][1] == pytest.approx(1.0, abs=1e-4)
        scores = [s for _, s in hits]
        assert scores == sorted(scores, reverse=True)
        assert len({i for i, _ in hits}) == 10


def test_scores_are_cosine_similarities(built):
    index = ItemIndex(built["vectors"], built["table"])
    query = np.random.default_rng(1).normal(size=index.dim).astype(np.float32) * 5.0
    hits = index.search(query, k=5)
    for item_id, score in hits:
        v = index.vector_of(item_id)
        cos = float(v @ query / (np.linalg.norm(v) * np.linalg.norm(query)))
        assert score == pytest.approx(cos, abs=1e-4)


def test_exclude_removes_items_and_still_returns_k(built):
    index = ItemIndex(built["vectors"], built["table"])
    vec = index.vector_of("item_00042")
    top = [i for i, _ in index.search(vec, k=5)]
    excluded = set(top[:3])
    hits = index.search(vec, k=5, exclude=excluded)
    ids = [i for i, _ in hits]
    assert len(ids) == 5
    assert not excluded & set(ids)
    assert ids[:2] == top[3:5]  # the rest keep their order


def test_similar_never_returns_the_item_itself(built):
    index = ItemIndex(built["vectors"], built["table"])
    hits = index.similar("item_00007", k=8)
    assert len(hits) == 8
    assert "item_00007" not in {i for i, _ in hits}
    assert index.similar("no_such_item", k=8) is None
    assert index.similar("x' OR '1'='1", k=3) is None  # ids are quoted, not spliced


def test_missing_table_and_bad_items_are_clear_errors(built, tmp_path):
    with pytest.raises(NotFoundError, match=r"two_tower_v9.*tables: two_tower_v1"):
        ItemIndex(built["vectors"], "two_tower_v9")
    with pytest.raises(NotFoundError, match="tables: none"):
        ItemIndex(str(tmp_path / "empty"), "two_tower_v1")
    with pytest.raises(UserInputError, match="item_id"):
        build_item_index(str(tmp_path / "v"), "two_tower", 2, built["artifact"],
                         pd.DataFrame({"sku": ["a"]}))


def test_rebuild_replaces_the_table_in_one_step(built, tmp_path):
    vectors = str(tmp_path / "vectors")
    subset = built["items"].iloc[:50]
    build_item_index(vectors, "two_tower", 1, built["artifact"], built["items"])
    build_item_index(vectors, "two_tower", 1, built["artifact"], subset)
    index = ItemIndex(vectors, "two_tower_v1")
    assert len(index) == 50
    assert index.vector_of("item_00100") is None


def test_large_catalogue_gets_a_graph_whose_recall_is_recorded(ray_session, tmp_path):
    n = 1500  # above the (lowered) exact threshold: the HNSW path, at test size
    items = make_items(n)
    layout = Layout.at(str(tmp_path / "home"))
    registry = ModelRegistry(layout)
    mv = registry.register("two_tower", make_artifact(tmp_path / "artifact", items, dim=32), {}, {}, "")
    name = build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, items,
                            batch_size=512, registry=registry, exact_max_rows=1000)
    index = ItemIndex(layout.vectors, name)
    assert len(index) == n and index.kind == "hnsw"
    assert persist.load_pointer(layout.vectors, name) is not None  # saved: replicas load, not build
    info = registry.index_info("two_tower", mv.version)
    assert info["kind"] == "hnsw" and info["rows"] == n and info["mode"] == "overwrite"
    assert info["recall_at_10"] == pytest.approx(index.recall) and info["recall_at_10"] >= 0.95
    probes = [f"item_{i:05d}" for i in range(0, n, n // 20)]
    first = sum(index.search(index.vector_of(p), k=10)[0][0] == p for p in probes)
    assert first >= len(probes) - 1


def test_upsert_embeds_new_items_with_the_version_model(built, tmp_path):
    vectors = str(tmp_path / "vectors")
    items = built["items"]
    build_item_index(vectors, "two_tower", 1, built["artifact"], items.iloc[:200])
    before = ItemIndex(vectors, "two_tower_v1")
    changed = items.iloc[[5]].assign(category="moved", price=999.0)
    build_item_index(vectors, "two_tower", 1, built["artifact"], pd.concat([items.iloc[200:], changed]),
                     mode="upsert")
    after = ItemIndex(vectors, "two_tower_v1")
    assert len(before) == 200 and len(after) == N_ITEMS
    np.testing.assert_allclose(after.vector_of("item_00250"),
                               ItemIndex(built["vectors"], built["table"]).vector_of("item_00250"), atol=1e-6)
    assert after.search(after.vector_of("item_00250"), 1)[0][0] == "item_00250"
    assert [i for i, _ in after.search(after.vector_of("item_00005"), 1, category="moved")] == ["item_00005"]
    assert before.refresh() == N_ITEMS - 200 and len(before) == N_ITEMS
