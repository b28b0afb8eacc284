"""Our DiT against diffusers' DiTTransformer2DModel (issue #26): the same network, then the same training.

1. With interop.convert_peer_dit.PEER_OPTIONS our DiT is the peer's network: its weights, loaded through the
   rename table, give the same forward pass (float64: every operation is the same, so only the order of float64
   roundings differs, ~1e-16 relative per operation; 1e-10 leaves room for the depth and widths here).
2. Our engine (the `digits-dit-flow` recipe sized down, with those options) and the peer's loop in bench/peers.py,
   started from the same weights and fed the same batches, timesteps and noise, take the same steps.
"""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from difftrain.config import ConfigError, ModelConfig, load_config
from difftrain.interop.convert_peer_dit import PEER_OPTIONS, check_peer_model, dit_from_peer, dit_to_peer, peer_config
from difftrain.models import build_model
from difftrain.models.dit import DiT, grid_positions, sincos_2d_dit
from difftrain.models.layers import timestep_embedding

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

BENCH = Path(__file__).resolve().parents[1] / "bench"
MODEL_KEYS = {k: v for k, v in PEER_OPTIONS.items() if k != "frequency_dim"}  # model.* keys


def peer_dit(**kw) -> DiT:
    return DiT(image_size=8, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10,
               weight_init="torch", **{**PEER_OPTIONS, **kw})


def forward_pair(ours: DiT, dtype=torch.float64, seed: int = 0):
    """(ours, peer's) outputs on one batch, the peer built by diffusers with default (random) weights loaded into ours."""
    torch.manual_seed(seed)
    peer = diffusers.DiTTransformer2DModel(**peer_config(peer_dit())).eval()  # the peer's layout, its own init
    ours.load_state_dict(dit_from_peer(peer.state_dict(), ours))
    ours.to(dtype).eval()
    peer.to(dtype)
    x, t, y = torch.randn(4, 1, 8, 8, dtype=dtype), torch.rand(4, dtype=dtype) * 1000, torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        return ours(x, t, y), peer(x, timestep=t, class_labels=y).sample


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0.0, 1.0])
def test_timestep_embedding_is_diffusers_get_timestep_embedding(flip, shift):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0.0, 1.5, 17.0, 999.0])
    theirs = get_timestep_embedding(t, 256, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(timestep_embedding(t, 256, flip_sin_to_cos=flip, freq_shift=shift), theirs)  # same float32 ops


def test_sincos_dit_is_diffusers_2d_table():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    assert torch.equal(sincos_2d_dit(grid_positions(5, 5), 32), get_2d_sincos_pos_embed(32, 5, base_size=5).float())


def test_peer_weights_give_the_peer_forward_in_float64():
    ours, theirs = forward_pair(peer_dit())
    assert theirs.abs().max() > 0.1  # the peer's default init: not the zero output of adaLN-Zero
    assert relative(ours, theirs) <= 1e-10


def test_peer_weights_give_the_peer_forward_in_float32():
    ours, theirs = forward_pair(peer_dit(), torch.float32)
    assert relative(ours, theirs) <= 1e-5  # ~100 float32 ulps through 2 blocks


@pytest.mark.parametrize("option", [{"time_freq_shift": 0.0}, {"mlp_norm_eps": 1e-6}, {"pos_embed": "sincos"}])
def test_each_peer_option_is_needed(option, monkeypatch):
    """Built without one of the options (the check bypassed to load the weights), the forward parts from the peer's
    far beyond the tolerance: the tolerance above is not loose enough to hide any of them."""
    import difftrain.interop.convert_peer_dit as conv

    monkeypatch.setattr(conv, "check_peer_model", lambda model: None)
    ours, theirs = forward_pair(peer_dit(**option))
    assert relative(ours, theirs) > 1e-7


def test_round_trip_and_refusals():
    torch.manual_seed(1)
    ours = peer_dit()
    twin = peer_dit()
    twin.load_state_dict(dit_from_peer(dit_to_peer(ours), twin))
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), twin.state_dict().values()))
    with pytest.raises(ConfigError, match=r"model.cond_embed=shared \(the peer's: per_block\)"):
        check_peer_model(peer_dit(cond_embed="shared"))
    state = dit_to_peer(ours)
    state.pop("proj_out_2.bias")
    state["transformer_blocks.2.norm1.linear.weight"] = torch.zeros(1)
    with pytest.raises(ConfigError, match=r"1 missing \(e.g. \['final.linear.bias'\]\); 1 the DiT has no place"):
        dit_from_peer(state, ours)


def test_model_config_keys_build_the_peer_network():
    cfg = ModelConfig(name="dit", hidden_size=32, depth=2, num_heads=2, image_size=8, in_channels=1, num_classes=10,
                      weight_init="torch", **MODEL_KEYS)
    model = build_model(cfg)
    check_peer_model(model)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in diffusers.DiTTransformer2DModel(**peer_config(model)).parameters())
    default = build_model(ModelConfig(name="dit", image_size=8, in_channels=1, num_classes=10))
    assert "time_embed.0.weight" in default.state_dict() and "block_embeds.0.time_embed.0.weight" not in default.state_dict()
    with pytest.raises(ConfigError, match="unknown cond_embed 'per_layer'; choose from shared, per_block"):
        build_model(ModelConfig(name="dit", image_size=8, in_channels=1, num_classes=10, cond_embed="per_layer"))


def test_sincos_dit_exports_to_sd3_and_peer_options_refuse_export():
    """The DiT/MAE table goes into SD3's pos_embed buffer as ours does; per-block embedders have no SD3 form."""
    from difftrain.interop.convert_dit import class_inputs, dit_config, dit_target, dit_to_diffusers

    torch.manual_seed(0)
    mc = ModelConfig(name="dit", hidden_size=32, depth=2, num_heads=2, image_size=8, in_channels=1, num_classes=10,
                     pos_embed="sincos_dit")
    ours = build_model(mc).eval()
    for p in ours.parameters():  # away from the zero init, so the output carries a signal
        p.data.normal_(0, 0.1)
    assert dit_target(ours, mc) == "sd3"
    sd3 = diffusers.SD3Transformer2DModel(**dit_config(ours, mc, "sd3")).eval()
    sd3.load_state_dict(dit_to_diffusers(ours, mc, "sd3"))
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([12.5, 500.0, 990.0]), torch.tensor([0, 7, 10])
    with torch.no_grad():
        mine, theirs = ours(x, t, y), sd3(x, timestep=t, **class_inputs(y, 10, "token", 3)).sample
    assert mine.abs().max() > 0.1 and relative(mine, theirs) <= 1e-5
    peer = ModelConfig(name="dit", image_size=8, in_channels=1, num_classes=10, **MODEL_KEYS)
    with pytest.raises(ConfigError, match="model.cond_embed=per_block, time_freq_shift=1.0, mlp_norm_eps=1e-05"):
        dit_target(build_model(peer), peer)


# --- 2. the same training ---------------------------------------------------------------------

STEPS = 5


@pytest.fixture
def peers_module(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("bench_peers", BENCH / "peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_peers", None)


def test_engine_and_peer_loop_take_the_same_steps(peers_module, tmp_path):
    """digits 8x8, width 32, depth 2, batch 8, 5 steps in float64; ours without label dropout, the peer with its
    in-model label dropout off, both at a constant lr (the peer's warm-up starts at lr 0, ours at lr / warm-up)."""
    from difftrain.training import Engine

    model_keys = [f"model.{k}={v}" for k, v in MODEL_KEYS.items()]
    cfg = load_config("digits-dit-flow", [
        f"run_dir={tmp_path / 'run'}", "train.progress=false", "train.tensorboard=false", "train.device=cpu",
        "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.weight_init=torch", *model_keys,
        "data.normalize=none", "data.black_white=0", "train.label_dropout=0", "train.batch_size=8",
        "train.warmup_steps=0", "train.lr_schedule=constant", f"train.steps={STEPS}", "train.weight_decay=0.01",
        "train.grad_clip=0.05"])  # a clip that binds, so the clipping is compared too
    engine = Engine(cfg)
    peer = peers_module.DiTFlowPeer(engine.cfg, 32, 2, 2, 2, peers_module.recipe_hparams(engine.cfg), seed=0, label_dropout=0.0)
    task = engine.task
    start = {k: v.clone() for k, v in peer.dit.state_dict().items()}
    task.model.load_state_dict(dit_from_peer(start, task.model))
    for module in (task.model, peer.dit, *(e.model for e in task.emas)):
        module.double()
    drawn = []
    draw = task.draw

    def draw_float64(batch):
        x0, y, ts, weights, noise = draw(batch)
        x0, ts, noise = x0.double(), ts.double(), noise.double()
        drawn.append((x0, y, noise, ts))  # in train_on's order
        return x0, y, ts, weights, noise

    task.draw = draw_float64
    ours, theirs, norms = [], [], []
    for _ in range(STEPS):
        result = engine.train_step(engine.budget.lr(engine.step))  # the engine's own lr schedule
        engine.step += 1
        ours.append(result.loss)
        norms.append(result.grad_norm)
        theirs.append(peer.train_on(*drawn[-1]))
    assert all(v > 0.1 for v in theirs) and len(set(theirs)) == STEPS  # real, changing losses
    assert min(norms) > 0.05  # the clip binds at every step
    # Both loops cast the prediction and the target to float32 before the MSE: the losses agree to float32 rounding.
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-6 * b
    weights, after = dit_to_peer(task.model), peer.dit.state_dict()
    assert max(relative(weights[k], after[k]) for k in weights) <= 1e-6
    assert max(relative(after[k], start[k].double()) for k in weights) > 1e-3  # the steps moved the weights
    fresh = peers_module.DiTFlowPeer(engine.cfg, 32, 2, 2, 2, peers_module.recipe_hparams(engine.cfg), seed=0)
    assert math.isfinite(fresh.step())  # the example's own draws (logit-normal u on the scheduler's grid) still run
