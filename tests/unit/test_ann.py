"""The serving-path index (retrieval.ann / retrieval.index) on synthetic vectors: no Ray.

Real LanceDB tables and real faiss graphs; small data (a few thousand 16-d vectors) with the
exact/HNSW threshold lowered so the graph path is the one under test.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.registry.registry import ModelRegistry
from aiplatform.retrieval import ann, persist
from aiplatform.retrieval.ann import HnswParams, LowRecallError, VectorIndex, normalize
from aiplatform.retrieval.index import ItemIndex, write_item_vectors

N, DIM, SMALL = 3000, 16, 500  # SMALL: exact_max_rows, so N items get a graph
CATS = [f"cat_{i}" for i in range(7)]


def clustered(n: int = N, dim: int = DIM, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, dim))
    return (centres[rng.integers(0, 40, n)] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)


def frame(vectors: np.ndarray, prefix: str = "item") -> pd.DataFrame:
    n = len(vectors)
    return pd.DataFrame({"item_id": [f"{prefix}_{i:05d}" for i in range(n)],
                         "category": [CATS[i % len(CATS)] for i in range(n)],
                         "price": np.linspace(1.0, 100.0, n), "vector": list(vectors)})


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    scores = normalize(vectors) @ normalize(query[None])[0]
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    order = np.argsort(-scores, kind="stable")[:k]
    return [int(i) for i in order if np.isfinite(scores[i])]


@pytest.fixture(scope="module")
def data():
    return clustered()


@pytest.fixture()
def table(tmp_path, data):
    vectors = str(tmp_path / "vectors")
    facts = write_item_vectors(vectors, "t_v1", frame(data), exact_max_rows=SMALL)
    return {"vectors": vectors, "facts": facts, "items": frame(data)}


def test_hnsw_recall_against_exact_is_above_the_threshold(data):
    index = VectorIndex.build([str(i) for i in range(N)], data, exact_max_rows=SMALL)
    assert index.kind == "hnsw"
    assert index.recall >= ann.MIN_RECALL
    # checked independently of measure_recall: fresh points of the same clusters, numpy truth
    queries = clustered(N + 200)[N:]
    hits = sum(len({int(i) for i, _ in index.search(q, 10)} & set(exact_top(data, q, 10))) for q in queries)
    assert hits / (10 * len(queries)) >= ann.MIN_RECALL


def test_small_catalogue_is_exact_and_scores_are_cosines(data):
    sub = data[:400]
    index = VectorIndex.build([str(i) for i in range(len(sub))], sub, exact_max_rows=SMALL)
    assert index.kind == "exact" and index.recall == 1.0
    q = np.random.default_rng(3).normal(size=DIM).astype(np.float32) * 4.0
    hits = index.search(q, 10)
    assert [int(i) for i, _ in hits] == exact_top(sub, q, 10)
    for item, score in hits:
        v = sub[int(item)]
        assert score == pytest.approx(float(v @ q / np.linalg.norm(v) / np.linalg.norm(q)), abs=1e-5)


def test_graph_scores_match_lancedb_cosine(table, data):
    index = ItemIndex(table["vectors"], "t_v1")
    assert index.kind == "hnsw" and persist.load_pointer(table["vectors"], "t_v1") is not None
    q = data[11] + 0.1
    hits = index.search(q, 5)
    lance = (index._table.search(q.astype(np.float32), vector_column_name="vector").distance_type("cosine")
             .select(["item_id", "_distance"]).limit(5).to_arrow())
    theirs = dict(zip(lance.column("item_id").to_pylist(), (1 - d for d in lance.column("_distance").to_pylist())))
    assert [i for i, _ in hits] == list(theirs)
    for item, score in hits:
        assert score == pytest.approx(theirs[item], abs=1e-4)


def test_a_crippled_graph_is_refused_unless_overridden(tmp_path, data):
    vectors = str(tmp_path / "vectors")
    crippled = HnswParams(m=2, ef_construction=2, ef_search=1)
    facts = write_item_vectors(vectors, "bad_v1", frame(data), exact_max_rows=SMALL, hnsw=crippled)
    assert facts["recall_at_10"] < ann.MIN_RECALL
    with pytest.raises(LowRecallError, match=r"recall@10 0\.\d+.*min_recall 0\.95.*allow_low_recall=True"):
        ItemIndex(vectors, "bad_v1")
    served = ItemIndex(vectors, "bad_v1", allow_low_recall=True)
    assert served.recall == pytest.approx(facts["recall_at_10"])
    assert len(served.search(data[0], 5)) == 5
    ItemIndex(vectors, "bad_v1", min_recall=0.0)  # a lower bar is the other override


def test_upserts_are_searchable_at_once_and_replace_old_vectors(table, data):
    index = ItemIndex(table["vectors"], "t_v1")
    other = ItemIndex(table["vectors"], "t_v1")  # another replica
    old_vec, new_vec = data[42], -data[42]  # item_00042 moves to the opposite side
    fresh = clustered(1, seed=99)[0]
    counts = index.upsert(pd.DataFrame({"item_id": ["item_00042", "brand_new"], "category": ["cat_1", "cat_2"],
                                        "price": [5.0, 6.0], "vector": [new_vec, fresh]}))
    assert counts == {"inserted": 1, "updated": 1, "attributes_only": 0}
    assert len(index) == N + 1
    assert index.search(fresh, 1)[0][0] == "brand_new"
    assert index.search(new_vec, 1)[0][0] == "item_00042"
    assert "item_00042" not in {i for i, _ in index.search(old_vec, 20)}  # the old node is dead
    np.testing.assert_allclose(index.vector_of("item_00042"), new_vec)  # and the table holds the new one
    assert index.similar("item_00042", 3, category="cat_1")  # similar() uses the new vector and category
    # another replica sees them after refresh(); a replica opened later at once
    assert other.search(fresh, 1)[0][0] != "brand_new"
    assert other.refresh() == 2 and other.search(fresh, 1)[0][0] == "brand_new"
    reopened = ItemIndex(table["vectors"], "t_v1")
    assert reopened.search(fresh, 1)[0][0] == "brand_new"
    assert "item_00042" not in {i for i, _ in reopened.search(old_vec, 20)}


def test_a_price_change_alone_touches_no_graph_node(table):
    index = ItemIndex(table["vectors"], "t_v1")
    row = table["items"].iloc[[7]].assign(price=999.0)
    assert index.upsert(row) == {"inserted": 0, "updated": 0, "attributes_only": 1}
    assert [i for i, _ in index.search(row["vector"].iloc[0], 3, price_min=500)] == ["item_00007"]


def test_many_replaced_vectors_rebuild_the_graph(data):
    index = VectorIndex.build([str(i) for i in range(N)], data, exact_max_rows=SMALL)
    moved = np.arange(0, int(N * 0.3))
    index.upsert([str(i) for i in moved], -data[moved])
    assert index.dead == 0 and len(index) == N  # rebuilt from the live rows
    assert index.search(-data[5], 1)[0][0] == "5"


@pytest.mark.parametrize("subset_rows", [ann.EXACT_SUBSET_ROWS, 10])  # exact over the subset; graph walk
def test_filters_return_k_matching_items(table, data, monkeypatch, subset_rows):
    monkeypatch.setattr(ann, "EXACT_SUBSET_ROWS", subset_rows)
    index = ItemIndex(table["vectors"], "t_v1")
    items = table["items"]
    q = data[123]
    for kw in ({"category": "cat_3"}, {"price_min": 20.0, "price_max": 40.0},
               {"category": ["cat_1", "cat_2"], "price_max": 50.0}, {"price_min": 99.0}):
        allowed = np.ones(N, bool)
        if "category" in kw:
            cats = [kw["category"]] if isinstance(kw["category"], str) else kw["category"]
            allowed &= items["category"].isin(cats).to_numpy()
        allowed &= items["price"].to_numpy() >= kw.get("price_min", -np.inf)
        allowed &= items["price"].to_numpy() <= kw.get("price_max", np.inf)
        hits = index.search(q, 10, **kw)
        assert len(hits) == min(10, allowed.sum()), kw
        got = [int(i.split("_")[1]) for i, _ in hits]
        assert allowed[got].all(), kw
        truth = exact_top(data, q, 10, allowed)
        assert len(set(got) & set(truth)) >= 9, kw  # graph walk: near-exact; subset: exact
    assert index.search(q, 10, category="no_such_category") == []
    assert index.search(q, 10, price_min=1e6) == []
    sim = index.similar("item_00123", 5, category="cat_0")
    assert len(sim) == 5 and all(items.set_index("item_id").loc[i, "category"] == "cat_0" for i, _ in sim)


def test_bad_filters_and_vectors_are_clear_errors(table, data):
    index = ItemIndex(table["vectors"], "t_v1")
    with pytest.raises(UserInputError, match=r"price_min \(50.0\) is greater than price_max \(10.0\)"):
        index.search(data[0], 5, price_min=50.0, price_max=10.0)
    with pytest.raises(UserInputError, match="price_min"):
        index.similar("item_00001", 5, price_min=50.0, price_max=10.0)
    with pytest.raises(UserInputError, match="price_max must be a number"):
        index.search(data[0], 5, price_max=float("nan"))
    with pytest.raises(UserInputError, match="expected 16"):
        index.search(np.ones(3), 5)
    with pytest.raises(UserInputError, match="'vector' has 3 dimensions; this index has 16"):
        index.upsert(pd.DataFrame({"item_id": ["x"], "vector": [np.ones(3)]}))
    with pytest.raises(UserInputError, match="column 'vector' is missing"):
        index.upsert(pd.DataFrame({"item_id": ["x"]}))


@pytest.mark.parametrize("filters", [{}, {"category": "cat_2"}])
def test_exclude_is_honoured(table, data, filters):
    index = ItemIndex(table["vectors"], "t_v1")
    q = data[77]
    top = [i for i, _ in index.search(q, 8, **filters)]
    hits = [i for i, _ in index.search(q, 5, exclude=set(top[:3]), **filters)]
    assert len(hits) == 5 and not set(top[:3]) & set(hits)
    assert hits[:5] == top[3:8]


def test_exact_rebuild_drops_the_saved_graph_and_upserts_in_place(table, data):
    small = frame(data[:100], prefix="s")
    write_item_vectors(table["vectors"], "t_v1", small)  # rebuilt small: exact, nothing beside the table
    assert persist.load_pointer(table["vectors"], "t_v1") is None
    assert sorted(p.name for p in Path(table["vectors"]).iterdir()) == ["t_v1.lance"]
    index = ItemIndex(table["vectors"], "t_v1")
    assert index.kind == "exact" and len(index) == 100
    index.upsert(pd.DataFrame({"item_id": ["s_00001"], "vector": [data[500]]}))
    assert index.search(data[500], 1)[0][0] == "s_00001"
    assert index.search(data[1], 1)[0][0] != "s_00001"


def test_a_build_told_to_stay_exact_is_served_exactly(tmp_path):
    vectors, n = str(tmp_path / "vectors"), ann.EXACT_MAX_ROWS + 50
    write_item_vectors(vectors, "big_v1", frame(clustered(n)), exact_max_rows=n)
    assert persist.load_pointer(vectors, "big_v1")["kind"] == "exact"
    assert ItemIndex(vectors, "big_v1").kind == "exact"  # not a graph built at open


def test_graph_is_saved_and_loaded_through_the_object_store(s3_root, data):
    vectors = f"{s3_root}/vectors"
    facts = write_item_vectors(vectors, "t_v1", frame(data), exact_max_rows=SMALL)
    assert facts["kind"] == "hnsw" and persist.load_pointer(vectors, "t_v1")["rows"] == N
    index = ItemIndex(vectors, "t_v1")
    assert index.search(data[9], 1)[0][0] == "item_00009"
    write_item_vectors(vectors, "t_v1", frame(data[:2], prefix="n"), mode="upsert", exact_max_rows=SMALL)
    assert ItemIndex(vectors, "t_v1").search(data[1], 1)[0][0] in {"n_00001", "item_00001"}
    assert len(ItemIndex(vectors, "t_v1")) == N + 2


def test_registry_records_index_facts(tmp_path):
    registry = ModelRegistry(Layout.at(str(tmp_path / "home")))
    art = tmp_path / "artifact"
    art.mkdir()
    (art / "weights.bin").write_bytes(b"x")
    mv = registry.register("two_tower", str(art), {}, {}, "")
    assert registry.index_info("two_tower", mv.version) is None
    registry.record_index("two_tower", mv.version, {"kind": "hnsw", "recall_at_10": 0.93})
    registry.record_index("two_tower", mv.version, {"kind": "hnsw", "recall_at_10": 0.97})
    info = registry.index_info("two_tower", mv.version)
    assert info["recall_at_10"] == 0.97 and info["kind"] == "hnsw" and "recorded_at" in info
    with pytest.raises(NotFoundError, match="no version 9"):
        registry.record_index("two_tower", 9, {"kind": "exact"})
