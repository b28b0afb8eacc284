"""Samplers on a tiny ADM UNet: the model's contract, classifier-free guidance, per-sample noise,
batch-size invariance of `generate`, and pinned full-loop values so no numerical change slips by."""

import pytest
import torch

from difftrain.generation import cycled_labels, generate
from difftrain.samplers import SAMPLERS, PerSampleNoise, guided
from tests.samplers_common import NUM_CLASSES, PINNED, SHAPE, Counting, pinned_run, tiny_config, tiny_unet


@pytest.fixture(scope="module")
def model():
    return tiny_unet()


def inputs(b: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, *SHAPE, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    y = torch.arange(b) % NUM_CLASSES
    return x, t, y


# --- the model -----------------------------------------------------------------------------


def test_zero_init_model_predicts_exactly_zero():
    x, t, y = inputs()
    with torch.no_grad():
        out = tiny_unet(perturb=False)(x, t, y)
    assert out.shape == x.shape and torch.equal(out, torch.zeros_like(x))


@torch.no_grad()
def test_unet_shapes_and_determinism(model):
    x, t, y = inputs()
    null = torch.full_like(y, NUM_CLASSES)
    outs = {}
    for name, labels in [("none", None), ("labels", y), ("null", null)]:
        out = model(x, t, labels)
        assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
        assert torch.equal(out, model(x, t, labels)), f"y={name}: two forwards differ"
        outs[name] = out
    assert outs["none"].abs().mean() > 1e-3  # the perturbation makes the output non-trivial
    assert torch.equal(outs["none"], outs["null"])  # y=None means the null class
    assert not torch.allclose(outs["labels"], outs["null"])  # labels matter
    assert not torch.allclose(model(x, t + 1, y), outs["labels"])  # so does t
    # each sample's output depends on that sample only
    torch.testing.assert_close(model(x[1:2], t[1:2], y[1:2]), outs["labels"][1:2], rtol=1e-5, atol=1e-6)


# --- classifier-free guidance ----------------------------------------------------------------


@torch.no_grad()
def test_guidance_scales_one_and_zero_are_single_plain_forwards(model):
    x, t, y = inputs()
    null = torch.full_like(y, NUM_CLASSES)
    for scale, labels in [(1.0, y), (0.0, null)]:
        counting = Counting(model)
        assert torch.equal(guided(counting, y, scale, NUM_CLASSES)(x, t), model(x, t, labels))
        assert counting.batches == [len(x)]
    # unconditional model or unlabelled batch: the null class, whatever the scale
    assert torch.equal(guided(model, None, 3.0, NUM_CLASSES)(x, t), model(x, t, null))
    assert torch.equal(guided(model, y, 3.0, None)(x, t), model(x, t, None))


@torch.no_grad()
def test_guidance_batches_cond_and_uncond_into_one_forward(model):
    x, t, y = inputs()
    counting = Counting(model)
    out = guided(counting, y, 3.0, NUM_CLASSES)(x, t)
    assert counting.batches == [2 * len(x)]  # one forward of twice the batch
    cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES))
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, cond, rtol=1e-3, atol=1e-3)


# --- per-sample noise ------------------------------------------------------------------------


def test_per_sample_noise_does_not_depend_on_the_batch():
    like = torch.empty(5, *SHAPE)
    whole = PerSampleNoise(seed=0, indices=range(5))
    draws = [whole.randn_like(like), whole.randn_like(like)]
    for part in ([0, 1], [2, 3, 4], [3], [4, 1]):
        noise = PerSampleNoise(seed=0, indices=part)
        for draw in draws:  # the first draw and the continuation of each stream
            assert torch.equal(noise.randn_like(torch.empty(len(part), *SHAPE)), draw[part])
    first = draws[0]
    assert not torch.equal(first[0], first[1])  # distinct streams per index
    assert not torch.equal(PerSampleNoise(seed=1, indices=range(5)).randn_like(like), first)  # and per seed
    assert torch.equal(PerSampleNoise(seed=0, indices=range(5)).randn_like(like.double()), first.double())
    with pytest.raises(ValueError, match="batch of 4 but 5 generators"):
        whole.randn_like(torch.empty(4, *SHAPE))


@pytest.mark.parametrize("sampler,steps", [("ddim", 10), ("ddpm", None)])
def test_generate_is_batch_size_invariant(model, sampler, steps):
    """Sample i depends on (seed, i, label i) only: batches of 7 (7 + 7 + 2) and one of 16 agree
    exactly. Guidance 3 (the default) runs the batched cond/uncond path; ddpm walks all 50 steps."""
    cfg = tiny_config(timesteps=50)
    labels = cycled_labels(16, NUM_CLASSES)
    a = generate(model, cfg, 16, labels=labels, sampler=sampler, steps=steps, batch_size=7, seed=3)
    b = generate(model, cfg, 16, labels=labels, sampler=sampler, steps=steps, batch_size=16, seed=3)
    assert a.shape == (16, *SHAPE) and a.dtype == torch.uint8
    assert torch.equal(a, b)
    assert ((a > 0) & (a < 255)).float().mean() > 0.3  # not all saturated: the comparison has teeth
    c = generate(model, cfg, 16, labels=labels, sampler=sampler, steps=steps, batch_size=16, seed=4)
    assert not torch.equal(a, c)


# --- pinned full-loop values (the table is tests/samplers_common.py's) ----------------------------


@pytest.mark.parametrize("case", list(PINNED), ids=lambda c: "-".join(map(str, c)))
def test_full_loop_pinned_values(model, case):
    x = pinned_run(model, case)
    assert x.shape == (4, *SHAPE) and torch.isfinite(x).all()
    total, mean_abs = PINNED[case]
    # the sum is a difference of large terms: compare it at 1e-4 of the total mass
    assert x.sum().item() == pytest.approx(total, rel=1e-4, abs=1e-4 * x.abs().sum().item())
    assert x.abs().mean().item() == pytest.approx(mean_abs, rel=1e-4)


def test_every_sampler_is_pinned():
    assert {case.sampler for case in PINNED} == set(SAMPLERS.names())
