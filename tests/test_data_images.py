"""data/images.py: uint8 (C, H, W) tensors and arrays -> PIL images."""

import numpy as np
import pytest
import torch

from difftrain.data.images import to_pil, to_pil_images


def test_to_pil_modes_pixels_and_scale():
    gray = torch.arange(6, dtype=torch.uint8).view(1, 2, 3)
    img = to_pil(gray)
    assert img.mode == "L" and img.size == (3, 2) and np.array_equal(np.asarray(img), gray[0].numpy())
    rgb = np.arange(18, dtype=np.uint8).reshape(3, 2, 3)
    big = to_pil(rgb, scale=2)
    assert big.mode == "RGB" and big.size == (6, 4)
    assert np.array_equal(np.asarray(big)[::2, ::2], rgb.transpose(1, 2, 0))


def test_to_pil_images_batch_and_bad_input():
    batch = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    pics = to_pil_images(batch)
    assert len(pics) == 4 and np.array_equal(np.asarray(pics[2]), batch[2].permute(1, 2, 0).numpy())
    with pytest.raises(ValueError, match="uint8 \\(C, H, W\\)"):
        to_pil(torch.zeros(3, 4, 4))  # float
    with pytest.raises(ValueError, match="1 or 3 channels"):
        to_pil(torch.zeros(2, 4, 4, dtype=torch.uint8))
