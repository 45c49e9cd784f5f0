"""FID / KID / precision-recall / IS through torch-fidelity's own feature->statistics->metric functions: equal to
`torch_fidelity.calculate_metrics` on the same folders and weights; FID of a set against itself is 0; IS is reported
unavailable (never a number) with weights that have no classifier."""
import pytest
import torch

from ldm.data.shapes import ShapesTrain
from ldm.evaluation.common import EvaluationError, count_label, metric_name, parse_metrics
from ldm.evaluation.distributed import shard_batches
from ldm.evaluation.evaluator import Evaluator
from ldm.evaluation.features import folder_batches, folder_files
from ldm.evaluation.fidelity import IS_UNAVAILABLE, FeatureStatistics, fid_from_statistics, fidelity_scores

REFERENCE_KEYS = {"fid": "frechet_inception_distance", "kid": "kernel_inception_distance_mean",
                  "kid_std": "kernel_inception_distance_std", "precision": "precision", "recall": "recall",
                  "f_score": "f_score", "isc": "inception_score_mean", "isc_std": "inception_score_std"}


@pytest.mark.parametrize("layer", ["64", pytest.param("2048", marks=pytest.mark.slow)])
def test_metrics_equal_torch_fidelity_calculate_metrics(layer, image_folders, classifier_weights):
    import torch_fidelity

    samples, reference = image_folders
    ev = Evaluator(["fid", "kid", "prc", "isc"], inception_weights=classifier_weights, feature_layer=layer,
                   progress=False)
    generated = ev.features(folder_batches(folder_files(samples), 64))
    real = FeatureStatistics.from_features(ev.features(folder_batches(folder_files(reference), 64))[layer])
    ours = ev.generation_scores(generated, real, 12)
    assert not ours.unavailable
    theirs = torch_fidelity.calculate_metrics(
        input1=samples, input2=reference, fid=True, kid=True, prc=True, isc=True, cuda=False, cache=False,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=classifier_weights,
        feature_layer_fid=layer, feature_layer_kid=layer, feature_layer_prc=layer,
        kid_subset_size=12, save_cpu_ram=True, verbose=False)  # ours caps the subset at the 12 images itself
    assert len(ours.values) == len(REFERENCE_KEYS)
    for metric, key in REFERENCE_KEYS.items():
        name = metric_name(metric, 12, layer=layer if metric[:3] != "isc" else "2048")
        assert ours.values[name] == pytest.approx(theirs[key], rel=1e-6, abs=1e-12), name
    assert ours.values[metric_name("fid", 12, layer=layer)] > 1.0  # two different sets of shapes


def test_fid_of_a_set_against_itself_is_zero(inception_weights):
    # 72 images > 64 feature dimensions: a full-rank covariance (at n below the dimension the eigenvalues of the
    # rank-deficient covariance product carry round-off of ~1e-5 in torch-fidelity's FID)
    ev = Evaluator(["fid"], inception_weights=inception_weights.path, feature_layer="64", progress=False)
    batches, _ = shard_batches(72, 24)
    features = ev.dataset_features(ShapesTrain(size=16, length=72), batches)["64"]
    stats = FeatureStatistics.from_features(features)
    assert abs(fid_from_statistics(stats, stats)) < 1e-6
    other = FeatureStatistics.from_features(features.flip(0))  # order does not matter
    assert abs(fid_from_statistics(stats, other)) < 1e-6
    half = FeatureStatistics.from_features(features[:36])
    assert fid_from_statistics(stats, half) > 1e-3


def test_inception_score_is_unavailable_without_a_classifier(image_folders, inception_weights):
    ev = Evaluator(["isc"], inception_weights=inception_weights.path, feature_layer="64", progress=False)
    generated = ev.features(folder_batches(folder_files(image_folders[0]), 64))
    assert "logits_unbiased" not in generated
    scores = fidelity_scores(generated, None, ["isc"], layer="64")
    assert scores.values == {}
    assert scores.unavailable == {"isc@12": IS_UNAVAILABLE}
    assert "fc is zero" in IS_UNAVAILABLE


def test_metric_names_carry_the_sample_count():
    assert [count_label(n) for n in (8, 500, 1000, 1500, 1234, 2000, 50000)] == \
        ["8", "500", "1k", "1.5k", "1234", "2k", "50k"]
    assert metric_name("fid", 2000) == "fid@2k"
    assert metric_name("kid_std", 500) == "kid_std@500"
    assert metric_name("fid", 1000, "floor") == "fid_floor@1k"
    assert metric_name("fid", 8, "floor", "64") == "fid_floor_d64@8"
    assert parse_metrics(["FID", "precision", "recall", "is", "clip_score"]) == ["fid", "prc", "isc", "clip"]
    with pytest.raises(EvaluationError, match="--metrics: unknown metric 'fdi'"):
        parse_metrics(["fdi"])


def test_too_few_images_for_precision_recall_is_one_line():
    features = {"2048": torch.rand(3, 2048)}
    with pytest.raises(EvaluationError, match="needs more than 3 images"):
        fidelity_scores(features, FeatureStatistics.from_features(torch.rand(5, 2048)), ["prc"])
