"""models/layers.py: the pieces the networks share."""

import math

import pytest
import torch
from torch import nn

from difftrain.models.layers import check_unet_size, class_labels, group_norm, timestep_embedding, zero_init


def test_timestep_embedding_is_cos_then_sin_and_pads_odd_widths():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 7)  # (2, 7): 3 frequencies, one pad column
    assert emb.shape == (2, 7)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))
    freqs = torch.tensor([1.0, math.exp(-math.log(10000.0) / 3), math.exp(-2 * math.log(10000.0) / 3)])
    torch.testing.assert_close(emb[1, :6], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))
    assert emb[1, 6] == 0


def test_group_norm_takes_the_largest_dividing_group_count():
    assert group_norm(64).num_groups == 32 and group_norm(48).num_groups == 24 and group_norm(7, 4).num_groups == 1
    assert group_norm(64, eps=1e-6).eps == 1e-6


def test_zero_init_and_null_class_labels():
    layer = zero_init(nn.Linear(3, 4))
    assert not layer.weight.any() and not layer.bias.any()
    x = torch.zeros(3, 1, 2, 2)
    assert class_labels(None, 10, x).tolist() == [10, 10, 10]
    y = torch.tensor([1, 2, 3])
    assert class_labels(y, 10, x) is y


def test_unet_size_check_names_the_levels():
    check_unet_size(32, (1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"image_size 28 is not divisible by 2\*\*3 \(channel_mult \[1, 2, 2, 2\]\)"):
        check_unet_size(28, (1, 2, 2, 2))


def test_timestep_embedding_sin_first_and_frequency_shift():
    t = torch.tensor([3.0])
    emb = timestep_embedding(t, 8, flip_sin_to_cos=False, freq_shift=1.0)  # 4 frequencies 10000^(-i / 3)
    freqs = torch.tensor([math.exp(-i * math.log(10000.0) / 3) for i in range(4)])
    torch.testing.assert_close(emb[0], torch.cat([torch.sin(3 * freqs), torch.cos(3 * freqs)]))
    assert torch.equal(timestep_embedding(t, 8), timestep_embedding(t, 8, flip_sin_to_cos=True, freq_shift=0.0))
