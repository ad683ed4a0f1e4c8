"""Models with the storage root in an object store (moto's S3 server): Ray Train checkpoints
under s3://…/runs, resuming from them, a candidate ranker attached without writing into the bucket's
checkpoint, the registry and its artifacts in the bucket, and the vector index built from the
registered artifact and searched there. Nothing here touches a local storage root.

The examples are built in memory (the shop's feature service joined point-in-time with
``features.pipeline.frame_from_events``), so this module depends on no other layer's
object-store support.
"""

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core import storage
from aiplatform.core.storage import Layout
from aiplatform.features.pipeline import frame_from_events, training_labels
from aiplatform.jobs import index as index_job
from aiplatform.jobs import train as train_job
from aiplatform.jobs.publish import artifact_to_register
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.candidates import CandidateConfig, CandidateRanker, candidates_dir_of
from aiplatform.models.two_tower import load_artifact, load_vocab, read_extra
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import ItemIndex, build_item_index
from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import split_by_time
from aiplatform.training.candidates import fit_ranker
from aiplatform.training.train import latest_epoch_of_run, train_two_tower
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate

pytestmark = pytest.mark.integration

TYPES = ("view", "click", "add_to_cart", "purchase")
INPUTS = UserInputSpec.from_service(recommender_user)


@pytest.fixture(scope="module")
def shop() -> dict:
    frames = generate(ShopSize(users=120, items=60, categories=6, days=20), seed=5)
    cutoff, train_events, _ = split_by_time(frames["events"], holdout_days=5)
    labels = training_labels(train_events, cutoff + pd.Timedelta(microseconds=1), TYPES)
    examples = frame_from_events(recommender_user, train_events, labels)
    assert len(examples) > 500
    return {"items": frames["items"], "examples": examples, "events": train_events}


def test_train_register_index_and_search_in_the_bucket(ray_session, s3_root, shop, tmp_path, monkeypatch):
    ray = ray_session
    monkeypatch.setenv("AIPLATFORM_CACHE_DIR", str(tmp_path / "cache"))  # this process's artifact downloads
    layout = Layout.at(s3_root)
    ds = ray.data.from_pandas([shop["examples"].iloc[i::2].reset_index(drop=True) for i in range(2)])
    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=64, epochs=1, dim=8, seed=0)

    # ---- Ray Train writes its checkpoints to s3://…/runs; checkpoint paths come back as URIs
    first = train_two_tower(ds, shop["items"], config, layout.runs, "tt", inputs=INPUTS)
    run = f"{layout.runs}/tt"
    assert first.checkpoint_path == f"{run}/epoch_0001"
    assert storage.exists(f"{first.checkpoint_path}/model.pt")
    assert read_extra(first.checkpoint_path)["epoch"] == 1
    assert latest_epoch_of_run(layout.runs, "tt") == 1
    assert latest_epoch_of_run(layout.runs, "no-such-run") is None

    # ---- the same run name resumes from the bucket's checkpoint (Result.from_path on S3)
    second = train_two_tower(ds, shop["items"], config.model_copy(update={"epochs": 2}), layout.runs, "tt",
                             inputs=INPUTS)
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]  # carried over, not retrained
    assert second.latest_checkpoint_path == f"{run}/epoch_0002"
    model, vocab = load_artifact(second.checkpoint_path)  # a URI: loaded from a node-local copy
    assert model.config() == second.model.config() and vocab == second.vocab

    # ---- a candidate ranker (the smallest fit: what is tested here is where it goes, not its quality)
    ranker = fit_ranker(shop["events"], shop["items"], CandidateConfig(per_source=10, neighbours=10, n_estimators=5,
                                                                       min_child_samples=5, category_model=False))
    checkpoint_files = storage.list_files(second.checkpoint_path)
    registry = ModelRegistry(layout)
    with artifact_to_register(second.checkpoint_path, ranker) as artifact:
        assert not storage.is_uri(artifact)
        mv = registry.register("two_tower", artifact, {"loss": second.history[-1]["loss"]}, second.params,
                               checkpoint_uri=second.checkpoint_path, lineage={"run": "tt"})
    # the bucket's checkpoint was not written to; the version holds the checkpoint and the ranker
    assert storage.list_files(second.checkpoint_path) == checkpoint_files
    assert not storage.exists(f"{second.checkpoint_path}/candidates")
    assert mv.version == 1 and mv.artifact_uri == layout.model_dir("two_tower", 1)
    got = ModelRegistry(Layout.at(s3_root)).get("two_tower", 1)
    assert got.checkpoint_uri == second.checkpoint_path and got.lineage == {"run": "tt"}
    assert candidates_dir_of(mv.artifact_uri) == f"{mv.artifact_uri}/candidates"
    assert CandidateRanker.load(candidates_dir_of(mv.artifact_uri)).feature_names == ranker.feature_names
    assert load_vocab(mv.artifact_uri) == second.vocab
    # a second version from the bucket's checkpoint itself, without a ranker
    with artifact_to_register(second.latest_checkpoint_path) as artifact:
        assert artifact == second.latest_checkpoint_path
        assert registry.register("two_tower", artifact, {}, {}, artifact).version == 2
    assert candidates_dir_of(layout.model_dir("two_tower", 2)) is None

    # ---- the vector index: embedded by Ray Data actors from the registered URI, stored in S3
    table = build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, shop["items"])
    assert storage.list_dirs(layout.vectors) == [f"{table}.lance"]
    index = ItemIndex(layout.vectors, table)
    assert len(index) == shop["items"]["item_id"].nunique()
    served, served_vocab = load_artifact(mv.artifact_uri)
    probe = served_vocab.item_ids[:3]
    with torch.inference_mode():
        expected = served.item_embedding(torch.as_tensor(served_vocab.indices(probe))).numpy()
    np.testing.assert_allclose(np.stack([index.vector_of(i) for i in probe]), expected, rtol=1e-5, atol=1e-6)
    for item_id in probe:
        hits = index.search(index.vector_of(item_id), k=5)
        assert hits[0][0] == item_id and hits[0][1] == pytest.approx(1.0, abs=1e-4)
    # a user query: the model's user tower against the stored item vectors
    hist, dense = served_vocab.encode_users([probe], np.zeros((1, INPUTS.n_dense), np.float32), INPUTS.history_len)
    with torch.inference_mode():
        user = served.user_embedding(hist, dense).numpy()[0]
    assert len(index.search(user, k=10, exclude=set(probe))) == 10


def test_jobs_refuse_an_unusable_root_before_any_work(s3_env, capsys):
    """A missing bucket exits 2 with the root named, before Ray or any model code starts."""
    root = "s3://no-such-bucket-aiplatform/home"
    assert index_job.main(["--home", root]) == 2
    assert "no-such-bucket-aiplatform" in capsys.readouterr().err
    assert train_job.main(["--home", root, "--epochs", "1"]) == 2
    assert "does not exist" in capsys.readouterr().err

