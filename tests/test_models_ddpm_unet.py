import torch

from difftrain.config import ModelConfig
from difftrain.models import MODELS, build_model
from difftrain.models.ddpm_unet import DDPMUNet


def test_reference_preset_plan_and_size():
    m = build_model(ModelConfig(name="ddpm_unet_ref", in_channels=3, image_size=32, num_classes=10))
    assert sum(p.numel() for p in m.parameters()) == 18_614_915  # a change to the plan shows here
    assert [d.conv[-1].net[-1].num_channels for d in m.downs] == [128, 256, 256]
    assert [(u.conv[0].net[0].in_channels, u.conv[-1].net[-1].num_channels) for u in m.ups] == [(512, 128), (256, 64), (128, 64)]
    assert m.label_embed.weight.shape == (11, 256)  # 10 classes + the null class, 256-d like the time encoding
    assert "ddpm_unet" in MODELS


def test_forward_shapes_null_class_and_conditioning():
    torch.manual_seed(0)
    m = DDPMUNet(image_size=16, in_channels=1, model_channels=8, channel_mult=(1, 2), num_heads=2, num_classes=26).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 10, 999])
    with torch.no_grad():
        out = m(x, t, torch.tensor([0, 5, 25]))
        assert out.shape == x.shape
        assert torch.allclose(m(x, t), m(x, t, torch.full((3,), 26)))  # y=None is the null class
        ones, twos = m(x, t, torch.tensor([1, 1, 1])), m(x, t, torch.tensor([2, 2, 2]))
        assert torch.isfinite(ones).all() and torch.isfinite(twos).all()  # NaN outputs would pass `not allclose`
        assert not torch.allclose(ones, twos)
    m(x, t).sum().backward()
    assert m.inc.net[0].weight.grad is not None
    uncond = DDPMUNet(image_size=8, in_channels=3, model_channels=8, channel_mult=(1, 2, 2), num_classes=0)
    assert uncond.label_embed is None and uncond(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 3, 8, 8)
