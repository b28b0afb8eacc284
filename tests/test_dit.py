"""DiT: shapes, patchify/unpatchify, adaLN-Zero init, RoPE's relative-position property, presets, overfitting."""

import pytest
import torch

from difftrain.config import ConfigError, DiffusionConfig, ModelConfig
from difftrain.models import MODELS, build_model
from difftrain.models.dit import DIT_PRESETS, SIZES, DiT, apply_rope, grid_positions, rope_2d
from difftrain.processes import build_process

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw) -> DiT:
    return DiT(image_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10, **kw)


@pytest.mark.parametrize("class_embed", ["token", "adaln"])
@pytest.mark.parametrize("pos_embed", ["rope", "sincos"])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_shapes_and_zero_output_at_init(class_embed, pos_embed, qk_norm):
    torch.manual_seed(0)
    m = tiny(class_embed=class_embed, pos_embed=pos_embed, qk_norm=qk_norm)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3) * 1000
    out = m(x, t, torch.tensor([0, 5, 10]))
    assert out.shape == x.shape
    assert torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero final layer: the model starts at 0
    assert m(x, t).shape == x.shape  # y=None: the null class


def test_adaln_zero_blocks_start_as_identity():
    torch.manual_seed(0)
    m = tiny()
    h, c = torch.randn(2, 17, 32), torch.randn(2, 32)
    for block in m.blocks:
        assert torch.equal(block(h, c), h)


def test_unpatchify_inverts_patchify_layout():
    m = DiT(image_size=8, in_channels=3, hidden_size=32, depth=1, num_heads=2, patch_size=4)
    x = torch.randn(2, 3, 8, 8)
    # Patchify by reshapes in the same raster order as the conv: (B, T, p * p * C) with channels last.
    tokens = x.view(2, 3, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 4, 48)
    assert torch.equal(m.unpatchify(tokens), x)


def test_rope_is_relative():
    """Shifting every position by the same offset leaves all attention scores q.k unchanged."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 12, 16), torch.randn(2, 3, 12, 16)
    pos = torch.randint(0, 7, (12, 2)).float()

    def scores(p):
        cos, sin = rope_2d(p, 16)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    base = scores(pos)
    assert torch.allclose(scores(pos + torch.tensor([3.0, -5.0])), base, atol=1e-4)
    assert torch.allclose(scores(pos + torch.tensor([0.0, 11.0])), base, atol=1e-4)
    assert not torch.allclose(scores(pos * 2), base, atol=1e-2)  # but it does see relative positions
    assert torch.allclose(apply_rope(q, *rope_2d(pos, 16)).norm(dim=-1), q.norm(dim=-1), atol=1e-5)  # a rotation


def test_rope_rows_and_columns_are_separate():
    pos = grid_positions(2, 3)
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    cos, _ = rope_2d(pos, 8)  # 4 channel pairs: 2 for the row, 2 for the column
    assert torch.equal(cos[1, :2], cos[0, :2]) and not torch.equal(cos[1, 2:], cos[0, 2:])


def test_model_errors():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        DiT(image_size=28, in_channels=1, patch_size=8)
    with pytest.raises(ValueError, match="token, adaln"):
        tiny(class_embed="concat")
    cfg = ModelConfig(name="dit", image_size=8, in_channels=1, num_classes=10, pos_embed="alibi")
    with pytest.raises(ConfigError, match="rope, sincos"):
        build_model(cfg)


def test_presets():
    assert set(DIT_PRESETS) <= set(MODELS.names())
    assert SIZES["XL"] == dict(depth=28, hidden_size=1152, num_heads=16)  # DiT, Table 1
    assert {n for n in DIT_PRESETS if n.startswith("dit_xl")} == {"dit_xl_2", "dit_xl_4", "dit_xl_8"}
    m = build_model(ModelConfig(name="dit_tiny_2", image_size=8, in_channels=1, num_classes=10))
    assert len(m.blocks) == 2 and m.patch_size == 2


def test_reference_size():
    """The MNIST reference: 3 layers, width 256, 4 heads, patch 2 on 28x28 (196 tokens + the class token)."""
    m = build_model(ModelConfig(name="dit", hidden_size=256, depth=3, num_heads=4, patch_size=2,
                                image_size=28, in_channels=1, num_classes=10))
    # 15 MB in float32; the reference reports about 27 MB
    assert m.grid == 14 and sum(p.numel() for p in m.parameters()) == 3_818_756


def test_tiny_dit_overfits_one_batch():
    torch.manual_seed(0)
    m = DiT(image_size=8, in_channels=1, hidden_size=64, depth=2, num_heads=4, num_classes=10)
    proc = build_process(DiffusionConfig(process="flow"))
    x0, y = torch.rand(8, 1, 8, 8) * 2 - 1, torch.arange(8)
    eps, sigma = torch.randn_like(x0), torch.rand(8)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = proc.loss(lambda x, t: m(x, t, y), x0, sigma, eps).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


def test_learned_sigma_output_channels():
    """DiT + DDPM with diffusion.learn_sigma: twice the input channels out, through the shared config key."""
    cfg = ModelConfig(name="dit_tiny_2", image_size=8, in_channels=1, num_classes=0, out_channels=2)
    assert build_model(cfg)(torch.randn(2, 1, 8, 8), torch.rand(2)).shape == (2, 2, 8, 8)


def test_per_block_conditioning_keeps_adaln_zero_and_its_own_embedders():
    """cond_embed=per_block: each block owns a timestep MLP and label table (the final layer uses block 0's);
    DiT's init still starts the model at 0, and the default's weight names (old checkpoints) are unchanged."""
    torch.manual_seed(0)
    m = tiny(class_embed="adaln", cond_embed="per_block")
    x, t, y = torch.randn(3, 1, 8, 8), torch.rand(3) * 1000, torch.tensor([0, 5, 10])
    assert torch.equal(m(x, t, y), torch.zeros_like(x))
    names = set(m.state_dict())
    assert {"block_embeds.1.time_embed.2.weight", "block_embeds.1.label_embed.weight"} <= names
    assert not any(n.startswith(("time_embed.", "label_embed.")) for n in names)
    assert {"time_embed.0.weight", "label_embed.weight"} <= set(tiny(class_embed="adaln").state_dict())
    for p in m.parameters():
        p.data.normal_(0, 0.1)
    out = m(x, t, y)
    with torch.no_grad():  # block 1's label table is read by block 1 only: changing it changes the output
        m.block_embeds[1].label_embed.weight[5] += 1.0
    assert not torch.allclose(m(x, t, y)[1], out[1]) and torch.equal(m(x, t, y)[0], out[0])


def test_torch_default_init_is_not_the_identity_and_shift_changes_the_frequencies():
    torch.manual_seed(0)
    m = tiny(class_embed="adaln", weight_init="torch")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 700.0]), torch.tensor([1, 2])
    out = m(x, t, y)
    assert out.abs().max() > 0.01  # no zero-init anywhere
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert not torch.allclose(m.blocks[0](h, c), h)
    m.time_freq_shift = 1.0  # frequencies 10000^(-i / 127): another timestep embedding, another output
    assert not torch.allclose(m(x, t, y), out)
    assert tiny(mlp_norm_eps=1e-5).blocks[1].norm2.eps == 1e-5
    with pytest.raises(ValueError, match=r"time_freq_shift 128 must lie in \[0, 128\)"):
        tiny(time_freq_shift=128)
    with pytest.raises(ValueError, match="unknown weight_init 'xavier'; choose from dit, torch"):
        tiny(weight_init="xavier")
