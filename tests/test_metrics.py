"""training.metrics: FID on EfficientNet-Lite0 features and prompt accuracy from the bundled proxy classifier."""
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fewstep.training import metrics as M
from fewstep.training import proxy_classifier as P
from fewstep.training.data import PROXY_CLASSES, load_proxy_dataset

SUBSET = 200  # images per FID set: ~4 s of features each on a 2-core CPU, and the orderings below hold by far


@pytest.fixture(scope="module")
def heldout():
    return load_proxy_dataset("heldout")


@pytest.fixture(scope="module")
def real_sets(heldout):
    rng = np.random.default_rng(0)
    train = load_proxy_dataset("train")
    return (heldout.images[rng.choice(len(heldout.images), SUBSET, replace=False)],
            train.images[rng.choice(len(train.images), SUBSET, replace=False)])


def _heavy_blur(images: np.ndarray) -> np.ndarray:
    """32x32 -> 4x4 -> 32x32: the layout of each image survives, its strokes and edges do not."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = F.interpolate(F.avg_pool2d(x, 8), size=images.shape[1:3], mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _shuffle_pixels(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same random permutation of pixel positions in every image: the colour histogram stays, the shapes go."""
    flat = images.reshape(len(images), -1, 3)
    return flat[:, rng.permutation(flat.shape[1])].reshape(images.shape)


@pytest.fixture(scope="module")
def features(real_sets):
    heldout_images, train_images = real_sets
    rng = np.random.default_rng(1)
    extract = M.get_feature_extractor("cpu")
    return {
        "heldout": extract(heldout_images),
        "train": extract(train_images),
        "noise": extract(rng.integers(0, 256, heldout_images.shape, dtype=np.uint8)),
        "blurred": extract(_heavy_blur(train_images)),
        "shuffled": extract(_shuffle_pixels(train_images, rng)),
    }


# --- FID --------------------------------------------------------------------------------------------------------

def test_features_are_pooled_1280d_and_deterministic(real_sets, features):
    images = real_sets[0][:12]
    extract = M.get_feature_extractor("cpu")
    assert extract is M.get_feature_extractor("cpu")  # one network per process
    again = extract(images)
    assert again.shape == (12, M.FEATURE_DIM) and again.dtype == torch.float32
    assert torch.equal(again, extract(images))
    assert torch.allclose(again, features["heldout"][:12], atol=1e-4)  # another batch size, same features
    assert torch.allclose(extract(images, batch_size=5), again, atol=1e-4)


def test_float_images_in_unit_range_give_the_uint8_features(real_sets):
    images = real_sets[0][:6]
    extract = M.get_feature_extractor("cpu")
    as_float = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    assert torch.allclose(extract(as_float), extract(images), atol=1e-4)
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        extract(as_float * 2 - 1)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        extract(images[..., 0])


def test_fid_of_a_set_against_itself_is_zero(real_sets, features):
    assert abs(M.fid_from_features(features["heldout"], features["heldout"])) < 1e-6
    assert abs(M.fid(real_sets[0][:24], real_sets[0][:24])) < 1e-6


def test_real_images_are_far_closer_to_real_than_noise_blur_or_shuffled_pixels(features):
    real = M.fid_from_features(features["heldout"], features["train"])
    noise = M.fid_from_features(features["heldout"], features["noise"])
    blurred = M.fid_from_features(features["heldout"], features["blurred"])
    shuffled = M.fid_from_features(features["heldout"], features["shuffled"])
    assert 0 < real < noise / 5, (real, noise)
    assert real < blurred / 2 and real < shuffled / 2, (real, blurred, shuffled)


def _gaussian_samples(mean: np.ndarray, cov: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).standard_normal((count, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T))).T  # whiten: sample covariance exactly I
    return z @ np.linalg.cholesky(cov).T + mean


def test_fid_from_features_matches_the_closed_form_for_gaussians():
    # For 2x2 covariances, tr sqrt(S_a S_b) = sqrt(tr(S_a S_b) + 2 sqrt(det S_a det S_b)):
    # the eigenvalues l1, l2 of S_a S_b are real and non-negative, and (sqrt l1 + sqrt l2)^2 = l1 + l2 + 2 sqrt(l1 l2).
    mean_a, mean_b = np.array([0.5, -1.0]), np.array([2.0, 0.25])
    cov_a, cov_b = np.array([[2.0, 0.6], [0.6, 1.0]]), np.array([[0.5, -0.3], [-0.3, 1.5]])  # do not commute
    trace_sqrt = np.sqrt(np.trace(cov_a @ cov_b) + 2 * np.sqrt(np.linalg.det(cov_a) * np.linalg.det(cov_b)))
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_sqrt
    a, b = _gaussian_samples(mean_a, cov_a, 500, seed=0), _gaussian_samples(mean_b, cov_b, 300, seed=1)
    assert M.fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert M.fid_from_features(torch.from_numpy(a).float(), b) == pytest.approx(expected, rel=1e-5)


def test_fid_of_diagonal_gaussians_is_the_sum_of_squared_differences_of_means_and_deviations():
    mean_a, mean_b = np.zeros(5), np.arange(5.0)
    var_a, var_b = np.array([1.0, 4.0, 9.0, 0.25, 2.0]), np.array([4.0, 1.0, 9.0, 1.0, 0.5])
    a = M.FeatureStatistics.from_moments(torch.from_numpy(mean_a), torch.diag(torch.from_numpy(var_a)), 100)
    b = M.FeatureStatistics.from_moments(torch.from_numpy(mean_b), torch.diag(torch.from_numpy(var_b)), 100)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    assert M.frechet_distance(a, b) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="N >= 2"):
        M.fid_from_features(np.zeros((1, 4)), np.zeros((3, 4)))


def test_sample_factor_and_matrix_square_root_give_the_same_distance():
    # Fewer samples than dimensions: from_features factors the covariance by the centred samples; from_moments
    # takes its square root. Both must give the same distance, to each other set and to themselves (zero).
    rng = np.random.default_rng(0)
    few = rng.standard_normal((40, 64)) @ rng.standard_normal((64, 64))
    other = rng.standard_normal((30, 64)) + 0.5
    by_samples = M.FeatureStatistics.from_features(few)
    by_moments = M.FeatureStatistics.from_moments(by_samples.mean, by_samples.cov, by_samples.count)
    target = M.FeatureStatistics.from_features(other)
    assert by_samples.factor.shape == (40, 64) and by_moments.factor.shape == (64, 64)
    assert M.frechet_distance(by_samples, target) == pytest.approx(M.frechet_distance(by_moments, target), rel=1e-9)
    assert abs(M.frechet_distance(by_samples, by_moments)) < 1e-6 * float(by_samples.cov.trace())


def test_the_benchmark_reference_is_embedded_once_per_process_and_class_balanced():
    from fewstep.training import scores

    first = scores.reference(device="cpu")
    assert scores.reference(device="cpu") is first
    assert first.effnet.count == 20 * scores.REFERENCE_PER_CLASS and first.effnet.mean.shape == (M.FEATURE_DIM,)
    assert first.effnet.cov.dtype == torch.float64 and np.bincount(first.embedded.labels).min() == scores.REFERENCE_PER_CLASS


# --- prompt accuracy --------------------------------------------------------------------------------------------

def test_bundled_classifier_is_accurate_on_heldout_and_says_so(heldout):
    metadata = P.proxy_classifier_metadata()
    assert metadata["kind"] == "proxy_classifier" and tuple(metadata["classes"]) == PROXY_CLASSES
    accuracy = P.prompt_accuracy(heldout.images, heldout.labels)
    assert accuracy >= 0.9
    assert accuracy == pytest.approx(metadata["heldout_accuracy"], abs=2e-3)


def test_bundled_classifier_is_near_chance_on_noise():
    noise = np.random.default_rng(0).integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    labels = np.arange(400) % len(PROXY_CLASSES)  # balanced: any fixed guess scores exactly 1/20
    assert P.prompt_accuracy(noise, labels) < 0.15


def test_prompt_accuracy_resizes_other_sizes_and_checks_lengths(heldout):
    picks = np.random.default_rng(0).choice(len(heldout.images), 200, replace=False)
    upscaled = F.interpolate(torch.from_numpy(heldout.images[picks]).permute(0, 3, 1, 2).float() / 255, size=64,
                             mode="bilinear", align_corners=False)
    assert P.prompt_accuracy(upscaled, heldout.labels[picks]) >= 0.85
    with pytest.raises(ValueError, match="labels"):
        P.prompt_accuracy(heldout.images[:3], heldout.labels[:2])


def test_classifier_file_round_trip_is_strict(tmp_path):
    classifier = P.ProxyClassifier(width=8).eval()
    options = P.ClassifierTraining(width=8)
    path = tmp_path / "clf.safetensors"
    P.save_proxy_classifier(classifier, path, 0.5, options)
    loaded = P.load_proxy_classifier(path, device="cpu")
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(loaded(x), classifier(x))
    assert P.proxy_classifier_metadata(path)["training"] == dataclasses.asdict(options)


def test_random_shift_moves_each_image_by_at_most_max_shift():
    images = torch.zeros(64, 1, 9, 9)
    images[:, :, 4, 4] = 1.0  # one bright pixel in the centre
    shifted = P.random_shift(images, 2, torch.Generator().manual_seed(0))
    rows, cols = torch.nonzero(shifted[:, 0] == 1.0)[:, 1:].T
    assert shifted.shape == images.shape and shifted.sum() == 64
    assert rows.sub(4).abs().max() <= 2 and cols.sub(4).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # offsets differ between images


def test_clip_score_equals_clip_models_own_similarity(tmp_path):
    """Against CLIPModel.forward's logits_per_image / logit_scale, on images already at the model's input size."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

    from fewstep.training.clip_tokenizer import load_clip_tokenizer
    from fewstep.training.clip_score import CLIP_MEAN, CLIP_STD, clip_score

    text = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=77, eos_token_id=49407, bos_token_id=49406, pad_token_id=49407)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    tokenizer = load_clip_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    captions = ["a cat", "a dog", "a handwritten digit seven", "a cat"]
    with torch.no_grad():
        out = model(input_ids=tokenizer(captions, padding=True, return_tensors="pt").input_ids,
                    pixel_values=(images - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1))
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    expected = float((100 * cos).clamp(min=0).mean())
    assert clip_score(images, captions, tmp_path, batch_size=3, device="cpu") == pytest.approx(expected, rel=1e-4)
