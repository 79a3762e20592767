"""The benchmark's scores and their noise, on real proxy images: the bootstrap interval is as wide as the spread of
disjoint real sets, class FID sees wrong-class images that the EfficientNet FID does not, and every weighted score
equals its plain formula on the explicitly resampled set."""
import numpy as np
import pytest
import torch

from fewstep.training import scores as S
from fewstep.training.data import PROXY_CLASSES, balanced_indices, load_proxy_dataset
from fewstep.training.evaluation import SPLITS, class_major, prompt_set
from fewstep.training.metrics import FeatureStatistics, fid_from_features

PER_CLASS, SETS = 10, 10   # ten disjoint real sets of 200 images (10 per class)


@pytest.fixture(scope="module")
def real_sets():
    """Real training images in the benchmark's layout (class by class; a class's k-th image in set k // PER_CLASS)."""
    train = load_proxy_dataset("train")
    picks = balanced_indices(train.labels, PER_CLASS * SETS, seed=1)
    labels, _, set_of = class_major(PER_CLASS, SETS)
    return S.embed(train.images[picks], labels, "cpu"), set_of


def _subset(embedded: S.Embedded, mask: np.ndarray) -> S.Embedded:
    return S.Embedded(embedded.effnet[mask], embedded.domain[mask], embedded.predictions[mask], embedded.labels[mask])


def _half_width(row: dict, name: str) -> float:
    low, high = row["intervals"][name]
    return (high - low) / 2


def test_the_bootstrap_interval_covers_the_spread_of_disjoint_real_sets(real_sets):
    embedded, set_of = real_sets
    rows = [S.score(_subset(embedded, set_of == s), resamples=100, device="cpu") for s in range(SETS)]
    for name in S.SCORES:
        values = np.array([r[name] for r in rows])
        half_width = np.mean([_half_width(r, name) for r in rows])
        # The 95 % interval of one set holds (nearly) every other disjoint set's value around their mean ...
        inside = np.abs(values - values.mean()) <= half_width
        assert inside.mean() >= 0.9, (name, values, half_width)
        # ... and is not so wide that it could hold anything: its se is within a factor of the sets' spread (for the
        # 1280-d FID of 200 images the bootstrap is conservative, about 2.3x: repeats add a spread of their own).
        spread = values.std(ddof=1)
        assert 0.5 * spread <= half_width / S.Z_95 <= 3.0 * spread, (name, spread, half_width / S.Z_95)


def test_class_fid_rises_with_wrong_class_images_where_the_effnet_fid_barely_moves(real_sets):
    embedded, set_of = real_sets
    clean_mask = set_of < 2                      # 400 images
    pool = np.flatnonzero(set_of >= 2)           # the replacements: real images of other sets, of another class
    rng = np.random.default_rng(0)
    effnet, domain, predictions = embedded.effnet.clone(), embedded.domain.clone(), embedded.predictions.copy()
    for c in range(len(PROXY_CLASSES)):
        members = np.flatnonzero(clean_mask & (embedded.labels == c))
        for i in members[: len(members) // 5]:   # a fifth of every class: the class mix stays balanced
            other = rng.choice(pool[embedded.labels[pool] != c])
            effnet[i], domain[i], predictions[i] = embedded.effnet[other], embedded.domain[other], embedded.predictions[other]
    wrong = S.Embedded(effnet, domain, predictions, embedded.labels)
    clean_row = {"name": "clean", "samples": 400, **S.score(_subset(embedded, clean_mask), resamples=100, device="cpu")}
    wrong_row = {"name": "wrong", "samples": 400, **S.score(_subset(wrong, clean_mask), resamples=100, device="cpu")}
    assert wrong_row["class_fid"] > clean_row["intervals"]["class_fid"][1] + _half_width(wrong_row, "class_fid")
    assert wrong_row["class_fid"] > 2 * clean_row["class_fid"]
    assert abs(wrong_row["fid"] - clean_row["fid"]) < _half_width(clean_row, "fid")
    verdicts = S.compare(wrong_row, clean_row)
    assert verdicts["class_fid"] == "worse" and verdicts["prompt_accuracy"] == "worse"
    assert set(S.compare(clean_row, clean_row).values()) == {S.WITHIN_NOISE}


def _naive_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Kynkaanniemi et al. 2019 written out: a point is inside a set's manifold if it lies within some member's
    distance to that member's k-th nearest neighbour in the set."""
    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(d, axis=1)[:, k]   # column 0 is the point itself
    def inside(points, manifold):
        r = radii(manifold)
        return np.mean([np.any(np.linalg.norm(manifold - p, axis=1) <= r) for p in points])
    return inside(fake, real), inside(real, fake)


def test_weighted_scores_equal_their_formulas_on_the_explicitly_resampled_set(real_sets):
    embedded, set_of = real_sets
    one = _subset(embedded, set_of == 0)
    ref = S.reference(device="cpu")
    counts = S.bootstrap_counts(one.labels, 1, seed=3)[0]
    drawn = np.repeat(np.arange(len(counts)), counts.long().numpy())
    measures = S._Measures(one, ref)(counts)
    assert measures["fid"] == pytest.approx(fid_from_features(one.effnet[drawn], ref.embedded.effnet), rel=1e-9)
    assert measures["fid_classifier"] == pytest.approx(fid_from_features(one.domain[drawn], ref.embedded.domain), rel=1e-9)
    per_class = [fid_from_features(one.domain[drawn][one.labels[drawn] == c], ref.embedded.domain[ref.embedded.labels == c])
                 for c in range(len(PROXY_CLASSES))]
    assert measures["class_fid"] == pytest.approx(np.mean(per_class), rel=1e-9)
    assert measures["prompt_accuracy"] == pytest.approx(np.mean(one.predictions[drawn] == one.labels[drawn]))
    # Precision and recall on the whole set (the resampled manifold keeps each distinct sample once).
    plain = S._Measures(one, ref)(torch.ones(len(one.labels), dtype=torch.float64))
    precision, recall = _naive_precision_recall(ref.embedded.domain.numpy(), one.domain.numpy(), S.NEIGHBOURS)
    assert plain["precision"] == pytest.approx(precision) and plain["recall"] == pytest.approx(recall)
    distinct = np.unique(drawn)
    assert measures["recall"] == pytest.approx(_naive_precision_recall(ref.embedded.domain.numpy(), one.domain[distinct].numpy(),
                                                                       S.NEIGHBOURS)[1])
    # The reference is class-balanced like every generated set.
    assert np.bincount(ref.embedded.labels).tolist() == [S.REFERENCE_PER_CLASS] * len(PROXY_CLASSES)
    assert isinstance(ref.effnet, FeatureStatistics)


def test_splits_and_seed_sets_are_disjoint_and_validation_keeps_the_earlier_seeds():
    validation, test = prompt_set(5, "validation", 3), prompt_set(5, "test", 3)
    assert len(validation.captions) == 20 * 15 and validation.captions == test.captions
    assert not set(validation.seeds) & set(test.seeds)
    assert min(test.seeds) == SPLITS["test"]
    first_class = slice(0, 15)
    assert validation.seeds[first_class] == list(range(15)) and validation.seed_sets[first_class].tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert prompt_set(5).seeds[:5] == [0, 1, 2, 3, 4]   # set 0 of validation: the seeds every earlier table used
    with pytest.raises(ValueError, match="unknown split"):
        prompt_set(5, "train")
