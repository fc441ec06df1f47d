import numpy as np

from duch.data.augment import ImageAugment, TextAugment, augment_caption, augment_image, view_rng
from duch.data.images import load_image

from .conftest import ASSETS


def test_image_views_are_deterministic_per_seed_item_and_view():
    img = load_image(ASSETS / "156.jpg")
    first = np.asarray(augment_image(img, view_rng(0, "156", 1)))
    assert np.array_equal(first, np.asarray(augment_image(img, view_rng(0, "156", 1))))
    assert not np.array_equal(first, np.asarray(augment_image(img, view_rng(0, "156", 2))))
    assert not np.array_equal(first, np.asarray(augment_image(img, view_rng(1, "156", 1))))


def test_rotations_and_flips_alone_only_permute_pixels():
    img = load_image(ASSETS / "102.jpg")
    geometric = ImageAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter=0.0, blur_p=0.0)
    for view in range(1, 6):
        out = np.asarray(augment_image(img, view_rng(3, "102", view), geometric))
        assert out.shape == (256, 256, 3)
        assert np.array_equal(np.sort(out, axis=None), np.sort(np.asarray(img), axis=None))


def test_odd_sized_images_keep_their_size_up_to_rotation():
    img = load_image(ASSETS / "156.jpg")  # 253 x 256
    sizes = {augment_image(img, view_rng(0, "x", v)).size for v in range(1, 9)}
    assert sizes == {(253, 256), (256, 253)}


def test_caption_rewrite_is_deterministic_and_keeps_words():
    text = "there are many planes parked next to the terminal building"
    out = augment_caption(text, view_rng(0, "a", 1), TextAugment(word_dropout=0.3, swap_p=1.0))
    assert out == augment_caption(text, view_rng(0, "a", 1), TextAugment(word_dropout=0.3, swap_p=1.0))
    assert out != text and set(out.split()) <= set(text.split())
    assert augment_caption("runway", view_rng(0, "a", 1)) == "runway"  # never empties a caption
