"""Batched SimCLR augmentations (shapes, seeding, normalisation, exact geometry) and the orientation views of
classifiers (training draws, test-time averaging)."""

from __future__ import annotations

import pytest
import torch

from rxray.models.backbones import build_encoder
from rxray.models.classifier import Classifier, class_probabilities
from rxray.models.heads import ClassifierHead
from rxray.models.orientation import ORIENTATIONS, RandomOrientation, orient, random_orientation
from rxray.ssl.augment import SimCLRAugment, normalize

CHANNEL_MEAN = [20.0, 30.0, 40.0, 25.0, 35.0, 45.0]
CHANNEL_STD = [5.0, 6.0, 7.0, 8.0, 9.0, 10.0]


def _images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 6, size, size), generator=generator, dtype=torch.uint8)


def _augment(crop: int = 24, **kwargs) -> SimCLRAugment:
    return SimCLRAugment(crop, mean=CHANNEL_MEAN, std=CHANNEL_STD, **kwargs)


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("blur", [False, True])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_two_float_views_of_the_crop_size(blur, dtype):
    views = _augment(blur=blur)(_images().to(dtype), _seeded(0))
    assert len(views) == 2
    for view in views:
        assert view.shape == (4, 6, 24, 24)
        assert view.dtype == torch.float32
        assert torch.isfinite(view).all()


def test_same_seed_same_views_and_different_seed_different_views():
    augment, images = _augment(blur=True), _images()
    first = augment(images, _seeded(7))
    again = augment(images, _seeded(7))
    other = augment(images, _seeded(8))
    for a, b in zip(first, again):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(first[0], other[0])


def test_global_seed_is_used_without_a_generator():
    augment, images = _augment(), _images()
    torch.manual_seed(3)
    first = augment(images)
    torch.manual_seed(3)
    again = augment(images)
    torch.testing.assert_close(first[0], again[0], rtol=0, atol=0)


def test_the_two_views_differ_per_sample():
    view1, view2 = _augment()(_images(batch=8), _seeded(0))
    per_sample_difference = (view1 - view2).abs().flatten(1).mean(dim=1)
    assert (per_sample_difference > 0.01).all()


def test_uint8_and_float_inputs_give_the_same_views():
    images = _images()
    from_uint8 = _augment(blur=True)(images, _seeded(5))
    from_float = _augment(blur=True)(images.float(), _seeded(5))
    for a, b in zip(from_uint8, from_float):
        torch.testing.assert_close(a, b)


def test_normalize_is_per_channel_z_score():
    images = _images()
    expected = (images.float() - torch.tensor(CHANNEL_MEAN).view(1, 6, 1, 1)) / torch.tensor(CHANNEL_STD).view(1, 6, 1, 1)
    torch.testing.assert_close(normalize(images, CHANNEL_MEAN, CHANNEL_STD), expected)
    torch.testing.assert_close(normalize(images[0], CHANNEL_MEAN, CHANNEL_STD), expected[0])  # one image (C, H, W)
    with pytest.raises(ValueError, match="channel"):
        normalize(images[:, :3], CHANNEL_MEAN, CHANNEL_STD)


@pytest.mark.parametrize("blur", [False, True])
def test_views_of_flat_channels_are_normalised_exactly_without_jitter(blur):
    # Every crop, flip, rotation and blur of a flat channel is the same flat channel.
    levels = torch.tensor([10.0, 50.0, 90.0, 130.0, 170.0, 210.0])
    images = levels.view(1, 6, 1, 1).expand(3, 6, 32, 32).to(torch.uint8)
    for view in _augment(strength=0.0, blur=blur)(images, _seeded(1)):
        expected = ((levels - torch.tensor(CHANNEL_MEAN)) / torch.tensor(CHANNEL_STD)).view(1, 6, 1, 1)
        torch.testing.assert_close(view, expected.expand_as(view))


def test_brightness_jitter_stays_within_its_range():
    levels = torch.full((6,), 100.0)
    images = levels.view(1, 6, 1, 1).expand(16, 6, 16, 16)
    for view in _augment(crop=16, strength=1.0)(images, _seeded(2)):
        intensity = view * torch.tensor(CHANNEL_STD).view(1, 6, 1, 1) + torch.tensor(CHANNEL_MEAN).view(1, 6, 1, 1)
        relative = intensity.mean(dim=(2, 3)) / 100.0  # noise averages out over 256 pixels
        assert relative.min() > 1 - SimCLRAugment.BRIGHTNESS - 0.05
        assert relative.max() < 1 + SimCLRAugment.BRIGHTNESS + 0.05
        assert relative.std() > 0.05  # channels and samples really are jittered


class _SquareFullCrops(SimCLRAugment):
    ASPECT_RATIO = (1.0, 1.0)


def test_full_crop_geometry_is_an_exact_flip_or_rotation():
    images = _images(batch=16, size=12)
    augment = _SquareFullCrops(12, strength=0.0, mean=CHANNEL_MEAN, std=CHANNEL_STD, crop_scale=(1.0, 1.0))
    plain = normalize(images, CHANNEL_MEAN, CHANNEL_STD)
    seen = set()
    for view in augment(images, _seeded(4)):
        for sample, original in zip(view, plain):
            candidates = {(k, mirrored): torch.rot90(original.flip(-1) if mirrored else original, k, dims=(-2, -1))
                          for k in range(4) for mirrored in (False, True)}
            matches = [key for key, candidate in candidates.items() if torch.allclose(sample, candidate, atol=1e-4)]
            assert len(matches) == 1, "each view must be exactly one of the 8 symmetries of the square"
            seen.add(matches[0])
    assert len(seen) >= 6  # 32 draws reach (nearly) all 8 symmetries


def test_small_crops_zoom_in():
    # A left-to-right ramp: a crop of at most half the area spans a smaller intensity range than the image.
    ramp = torch.linspace(0, 255, 32).view(1, 1, 1, 32).expand(8, 6, 32, 32)
    augment = _augment(crop=32, strength=0.0, crop_scale=(0.2, 0.5))
    for view in augment(ramp, _seeded(6)):
        spread = view.amax(dim=(1, 2, 3)) - view.amin(dim=(1, 2, 3))
        full_spread = (255 - 0) / min(CHANNEL_STD)
        assert (spread < 0.9 * full_spread).all()


def test_bad_input_is_rejected():
    augment = _augment()
    with pytest.raises(ValueError, match="expected images"):
        augment(_images()[:, :3])
    with pytest.raises(ValueError, match="uint8 or float"):
        augment(_images().to(torch.int32))


# --------------------------------------------------------------------------- orientations (rxray.models.orientation)


def test_the_eight_orientations_are_the_squares_symmetries_exactly():
    images = _images(batch=2, size=8).float()
    views = [orient(images, view) for view in range(ORIENTATIONS)]
    assert len({tuple(v.flatten().tolist()) for v in views}) == ORIENTATIONS  # all distinct
    for view in views:  # pixels moved, never resampled
        assert torch.equal(view.flatten(2).sort(dim=2).values, images.flatten(2).sort(dim=2).values)
    assert torch.equal(views[4], images.flip(-1)) and torch.equal(orient(views[1], 3), images)
    with pytest.raises(ValueError, match="0..7"):
        orient(images, 8)


def test_random_orientation_picks_one_of_the_eight_per_image_from_its_generator():
    images = _images(batch=64, size=8).float()
    oriented = random_orientation(images, _seeded(0))
    assert torch.equal(oriented, random_orientation(images, _seeded(0)))
    picked = [next(v for v in range(ORIENTATIONS) if torch.equal(oriented[i], orient(images[i], v)))
              for i in range(len(images))]
    assert set(picked) == set(range(ORIENTATIONS))  # 64 draws reach every orientation
    normalised = RandomOrientation(CHANNEL_MEAN, CHANNEL_STD)(images, _seeded(0))
    assert torch.allclose(normalised, random_orientation(normalize(images, CHANNEL_MEAN, CHANNEL_STD), _seeded(0)))
    with pytest.raises(ValueError, match="square"):
        random_orientation(torch.zeros(1, 6, 8, 6))


def test_test_time_augmentation_makes_any_classifier_orientation_invariant():
    torch.manual_seed(0)
    encoder = build_encoder("resnet18", "adapt")
    model = Classifier(encoder, ClassifierHead(encoder.feature_dim, 3, extra_inputs=1), with_conc=True).eval()
    images, conc = normalize(_images(batch=3, size=32), CHANNEL_MEAN, CHANNEL_STD), torch.tensor([0.0, 1.0, 5.0])
    with torch.no_grad():
        averaged = class_probabilities(model, images, conc, views=ORIENTATIONS)
        single = [class_probabilities(model, orient(images, v), conc) for v in range(ORIENTATIONS)]
        assert torch.allclose(averaged, torch.stack(single).mean(dim=0), atol=1e-5)  # conc follows each view
        assert not torch.allclose(model.features(images), model.features(orient(images, 1)), atol=1e-3)  # alone
        for view in range(ORIENTATIONS):
            turned = class_probabilities(model, orient(images, view), conc, views=ORIENTATIONS)
            assert torch.allclose(turned, averaged, atol=1e-5)
    with pytest.raises(ValueError, match="views must be 1 or 8"):
        class_probabilities(model, images, conc, views=4)
