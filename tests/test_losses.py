import math

import numpy as np
import pytest
import torch

from duch.pipeline.model.coding import pack_codes, unpack_codes
from duch.pipeline.model.losses import (
    all_captions_contrastive,
    bank_contrastive,
    binary_nt_xent,
    bit_balance,
    discriminator_loss,
    fooling_loss,
    gradient_penalty,
    nt_xent,
    quantization,
    straight_through_sign,
    weighted_nt_xent,
)
from duch.pipeline.retrieval.hamming import hamming


def test_nt_xent_on_a_hand_computed_case():
    # Anchor e1: self masked, positive e1 (cos 1), negatives e2, e2 (cos 0): -log(e / (e + 2)).
    eye = torch.eye(2)
    assert float(nt_xent(eye, eye, tau=1.0)) == pytest.approx(math.log(2 + math.e) - 1, abs=1e-6)


def direct_nt_xent(a, b, tau):
    """SimCLR's formula, one anchor at a time."""
    z = torch.cat([a, b])
    z = z / z.norm(dim=1, keepdim=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = [math.exp(float(z[i] @ z[k]) / tau) for k in range(n2) if k != i]
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / sum(sims))
    return total / n2


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_nt_xent_matches_the_direct_formula(tau):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    assert float(nt_xent(a, b, tau)) == pytest.approx(direct_nt_xent(a, b, tau), rel=1e-5)


def test_weighted_nt_xent_weights_each_pairs_two_anchors():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    assert float(weighted_nt_xent(a, b, torch.ones(3), 0.5)) == pytest.approx(float(nt_xent(a, b, 0.5)), abs=1e-6)
    # Hand case of test_nt_xent_on_a_hand_computed_case: all four anchors lose log(2 + e) - 1; weights (1, 0)
    # keep pair 0's two anchors of the four.
    eye = torch.eye(2)
    expected = 2 * (math.log(2 + math.e) - 1) / 4
    assert float(weighted_nt_xent(eye, eye, torch.tensor([1.0, 0.0]))) == pytest.approx(expected, abs=1e-6)


def test_binary_nt_xent_on_a_hand_computed_case():
    # Signs (0 counts +1, as pack_codes): a -> (1,-1), (-1,1); b -> (1,-1), (1,1). Cosines of the +-1 codes:
    # a0.a1 = -1, a0.b0 = 1, a0.b1 = 0, a1.b0 = -1, a1.b1 = 0, b0.b1 = 0. Anchors a0 and b0: -log(e / (e + 1/e + 1));
    # a1 (positive b1): -log(1 / (1 + 2/e)); b1 (positive a1, the rest at 0): -log(1 / 3).
    a = torch.tensor([[0.2, -0.7], [-0.1, 0.4]])
    b = torch.tensor([[0.9, -0.05], [0.0, 3.0]])
    e = math.e
    expected = (2 * (math.log(e + 1 / e + 1) - 1) + math.log(1 + 2 / e) + math.log(3)) / 4
    assert float(binary_nt_xent(a, b)) == pytest.approx(expected, abs=1e-6)


def test_binary_nt_xent_passes_the_gradient_at_the_signs_straight_through():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(6, 16, generator=g).requires_grad_(True)
    b = torch.randn(6, 16, generator=g).requires_grad_(True)
    binary_nt_xent(a, b, tau=0.5).backward()
    signs = [torch.where(x.detach() >= 0, 1.0, -1.0).requires_grad_(True) for x in (a, b)]
    nt_xent(*signs, tau=0.5).backward()
    assert torch.allclose(a.grad, signs[0].grad) and torch.allclose(b.grad, signs[1].grad)
    assert a.grad.abs().sum() > 0
    assert torch.equal(straight_through_sign(torch.tensor([-0.5, 0.0, 2.0])), torch.tensor([-1.0, 1.0, 1.0]))


def test_all_captions_contrastive_on_a_hand_computed_case():
    # Images e1, e2; item 0's two captions are e1, item 1's are e2. An image anchor: two positives at cos 1 and two
    # negatives at cos 0, -log(2e / (2e + 2)); a caption anchor: -log(e / (e + 1)). Both are log(1 + 1/e).
    eye = torch.eye(2)
    captions = eye[:, None, :].repeat(1, 2, 1)
    assert float(all_captions_contrastive(eye, captions)) == pytest.approx(math.log(1 + 1 / math.e), abs=1e-6)


def direct_all_captions(image, captions, tau):
    """The same loss one anchor at a time: images over all captions (own ones positive), captions over images."""
    n, c, _ = captions.shape
    unit = lambda v: v / v.norm()  # noqa: E731
    cos = lambda i, j, k: float(unit(image[i]) @ unit(captions[j, k])) / tau  # noqa: E731
    image_side = sum(-math.log(sum(math.exp(cos(i, i, k)) for k in range(c))
                               / sum(math.exp(cos(i, j, k)) for j in range(n) for k in range(c))) for i in range(n))
    text_side = sum(-math.log(math.exp(cos(j, j, k)) / sum(math.exp(cos(i, j, k)) for i in range(n)))
                    for j in range(n) for k in range(c))
    return (image_side / n + text_side / (n * c)) / 2


@pytest.mark.parametrize("captions_per_item,tau", [(5, 1.0), (3, 0.3), (1, 1.0)])
def test_all_captions_contrastive_matches_the_direct_formula(captions_per_item, tau):
    g = torch.Generator().manual_seed(1)
    image, captions = torch.randn(4, 8, generator=g), torch.randn(4, captions_per_item, 8, generator=g)
    assert float(all_captions_contrastive(image, captions, tau)) == pytest.approx(
        direct_all_captions(image, captions, tau), rel=1e-5)


def test_gradient_penalty_of_a_linear_critic():
    critic = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
    real, fake = torch.randn(4, 2), torch.randn(4, 2)
    gp = gradient_penalty(lambda x: critic(x).squeeze(1), real, fake, torch.rand(4, 1))
    assert float(gp.detach()) == pytest.approx((5 - 1) ** 2)  # the gradient is w everywhere, |w| = 5


def test_bit_balance_and_quantization_values():
    h = torch.tensor([[1.0, -1.0, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    assert float(bit_balance(h)) == pytest.approx((0 + 16) / 2 / 4)
    assert float(quantization(torch.tensor([[0.5, -0.5]]), torch.tensor([[1.0, 1.0]]))) == pytest.approx(1.25)


def test_adversarial_terms():
    zero = torch.zeros(3)
    assert float(discriminator_loss(zero, zero)) == pytest.approx(2 * math.log(2))
    assert float(fooling_loss(torch.tensor([100.0]))) == pytest.approx(0.0, abs=1e-6)


def test_packing_round_trip_is_big_endian():
    h = np.array([[0.3, -0.2, 0.0, -1, 1, 1, -1, -1, 0.5, -0.5, -0.5, -0.5, -0.5, -0.5, -0.5, 0.9]])
    packed = pack_codes(h)
    assert packed.dtype == np.uint8 and packed.tolist() == [[0b10101100, 0b10000001]]
    assert np.array_equal(unpack_codes(packed, 16), np.where(h >= 0, 1, -1))


def test_hamming_equals_a_bit_count():
    rng = np.random.default_rng(0)
    q, db = rng.normal(size=(7, 64)), rng.normal(size=(11, 64))
    expected = ((q[:, None, :] >= 0) != (db[None, :, :] >= 0)).sum(axis=2)
    assert np.array_equal(hamming(pack_codes(q), pack_codes(db)), expected)


def test_bank_contrastive_on_a_hand_computed_case():
    # Unit codes e1, e2 against the binary bank rows (1, 1) and (1, -1), each scaled to length 1.
    bank = torch.tensor([[0.3, 0.9], [0.2, -0.4]])  # only the signs count
    c = 1 / math.sqrt(2)
    first = math.log(2)  # e1 is as close to both rows; its positive is row 0
    second = c + math.log(math.exp(c) + math.exp(-c))  # e2: logits (c, -c), positive row 1
    value = bank_contrastive(torch.eye(2) * 3, bank, torch.tensor([0, 1]), tau=1.0)
    assert float(value) == pytest.approx((first + second) / 2, rel=1e-6)
