"""sparge.calibrate: per-head search, capture by module path, merging, plots."""
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import LayerConfig, calibrate, calibrate_layer
from sparge.demo import VideoAttentionModel, make_video_qkv


def _rel_l1_per_head(out, ref):
    return ((out.float() - ref.float()).abs().sum((0, 2, 3)) / ref.float().abs().sum((0, 2, 3)))


def _check_chosen(rec, q, k, v, target, **kw):
    """The chosen values reproduce the recorded error and density, under the target."""
    assert torch.all(rec.error <= target), f"chosen error {rec.error.tolist()} over target {target}"
    out, st = sparge.attn(q, k, v, config=rec.layer_config(), return_stats=True, auto_dense=False, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=kw.get("is_causal", False))
    err = _rel_l1_per_head(out, ref)
    # config values are rounded up (towards computing more) to 6 digits
    assert torch.all(err <= target * 1.02), f"config gives error {err.tolist()} (target {target})"
    return err, st["density"].float().mean(0)


@pytest.mark.parametrize("mode", ["cdf", "topk"])
def test_calibrate_layer_meets_target_and_is_sparse(mode):
    q, k, v = make_video_qkv(4, 16, 16, heads=3, head_dim=64)
    rec = calibrate_layer(q, k, v, target=0.05, mode=mode)
    assert rec.num_heads == 3 and rec.mode == mode
    err, dens = _check_chosen(rec, q, k, v, 0.05)
    assert dens.max() < 0.7, f"calibrated density {dens.tolist()} is not sparse on structured input"
    assert torch.allclose(dens, rec.density.float(), atol=1e-6)
    # the search records every evaluated point: [steps, heads, candidates]
    S, H, C = rec.curve["density"].shape
    assert (S, H) == (8, 3) and C == rec.curve["sim"].shape[1]
    assert torch.all((rec.curve["selection"] > 0) & (rec.curve["selection"] <= 1))


def test_tighter_target_computes_more():
    q, k, v = make_video_qkv(4, 16, 16, heads=2, head_dim=64, seed=3)
    loose = calibrate_layer(q, k, v, target=0.08, pv_candidates=None)
    tight = calibrate_layer(q, k, v, target=0.01, pv_candidates=None)
    assert torch.all(tight.error <= 0.01) and torch.all(loose.error <= 0.08)
    assert tight.density.mean() > loose.density.mean()


@pytest.mark.parametrize("metric,target", [("rmse", 0.1), ("cosine", 0.005)])
def test_other_metrics(metric, target):
    q, k, v = make_video_qkv(4, 16, 16, heads=2, head_dim=64, seed=5)
    rec = calibrate_layer(q, k, v, target=target, metric=metric)
    out = sparge.attn(q, k, v, config=rec.layer_config(), auto_dense=False)
    ref = F.scaled_dot_product_attention(q, k, v)
    for h in range(2):
        o, r = out[:, h].flatten().double(), ref[:, h].flatten().double()
        e = ((o - r).norm() / r.norm()).item() if metric == "rmse" else 1 - F.cosine_similarity(o, r, dim=0).item()
        assert e <= target * 1.02, f"head {h}: {metric} {e} over {target}"
    assert rec.density.mean() < 1.0


def test_causal_gqa_and_key_padding():
    q, k, v = make_video_qkv(4, 16, 16, heads=4, head_dim=64, seed=7)
    k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()
    rec = calibrate_layer(q, k2, v2, is_causal=True, enable_gqa=True, target=0.05)
    out = sparge.attn(q, k2, v2, is_causal=True, enable_gqa=True, config=rec.layer_config(), auto_dense=False)
    ref = F.scaled_dot_product_attention(q, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), is_causal=True)
    assert torch.all(_rel_l1_per_head(out, ref) <= 0.051)
    pad = torch.ones(1, 1, 1, q.shape[2], dtype=torch.bool)
    pad[..., -100:] = False
    rec = calibrate_layer(q, k, v, attn_mask=pad, target=0.05)
    out = sparge.attn(q, k, v, attn_mask=pad, config=rec.layer_config(), auto_dense=False)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=pad)
    assert torch.all(_rel_l1_per_head(out, ref) <= 0.051)
    with pytest.raises(ValueError, match="attn_mask"):
        calibrate_layer(q, k, v, attn_mask=torch.zeros(q.shape[2], q.shape[2]))


def test_calibrate_model_by_module_path(tmp_path):
    model = VideoAttentionModel(layers=2, T=2, Hs=16, Ws=16, heads=2)
    res = calibrate(model, [0, 1], target=0.05, progress=False)
    assert sorted(res.config) == ["blocks.0.attn", "blocks.1.attn"]
    assert len(res.records) == 4 and [r.path for r in res.records[:2]] == ["blocks.0.attn", "blocks.1.attn"]
    assert res.config.metadata["calls"] == {"blocks.0.attn": 2, "blocks.1.attn": 2}
    # merged conservatively: per head the max of each sample's values
    for path in res.config:
        recs = [r for r in res.records if r.path == path]
        lc = res.config[path]
        want = torch.stack([r.selection for r in recs]).amax(0)
        assert all(a >= b - 1e-9 for a, b in zip(lc.cdf_threshold, want.tolist()))
        assert all(a >= b - 1e-4 for a, b in zip(lc.sim_threshold, torch.stack(
            [r.sim_threshold for r in recs]).amax(0).tolist()))
    summary = res.summary()
    assert set(summary) == set(res.config) and all(0 < s["density"] < 1 for s in summary.values())
    path = tmp_path / "cfg.json"
    res.save(path)
    back = sparge.SpargeConfig.load(path, num_heads={"blocks.0.attn": 2, "blocks.1.attn": 2})
    assert back == res.config
    assert json.loads(path.read_text())["metadata"]["target"] == 0.05
    # the merged config meets the target on the samples it saw
    for i, blk in enumerate(model.blocks):
        a = blk.attn
        for sample in (0, 1):
            q, k, v = make_video_qkv(2, 16, 16, 2, 64, seed=1000 * i + sample, sharpness=a.sharpness,
                                     noise=a.noise, weight_seed=i)
            out = sparge.attn(q, k, v, config=back.layer(f"blocks.{i}.attn"), auto_dense=False)
            err = _rel_l1_per_head(out, F.scaled_dot_product_attention(q, k, v))
            assert torch.all(err <= 0.0505), f"layer {i} sample {sample}: {err.tolist()}"


class _SpargeModel(torch.nn.Module):
    """Attention already routed to sparge (as the integrations do)."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Identity()

    def forward(self, qkv):
        q, k, v = qkv
        return sparge.attn(q, k, v, topk=0.1)


def test_calibrate_captures_sparge_attn_calls_and_runs_dense():
    q, k, v = make_video_qkv(2, 16, 16, heads=2, head_dim=64)
    outs = []

    def run(model, x):
        outs.append(model(x))

    res = calibrate(_SpargeModel(), [(q, k, v)], run=run, progress=False)
    assert list(res.config) == ["attention.0"]  # no submodule runs around the call

    def two_calls(q, k, v):  # a plain callable: calls keyed by their order within each input
        F.scaled_dot_product_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    res2 = calibrate(two_calls, [(q, k, v), (q, k, v)], progress=False)
    assert res2.config.metadata["calls"] == {"attention.0": 2, "attention.1": 2}
    assert torch.allclose(outs[0], F.scaled_dot_product_attention(q, k, v), atol=1e-6)
    assert sparge.functional._observer is None


def test_capture_restores_sdpa_on_error_and_skips_unsupported():
    orig = F.scaled_dot_product_attention

    def boom(q, k, v):
        F.scaled_dot_product_attention(q, k, v)
        raise RuntimeError("model failed")

    q, k, v = make_video_qkv(2, 16, 16, heads=2, head_dim=64)
    with pytest.raises(RuntimeError, match="model failed"):
        calibrate(boom, [(q, k, v)], progress=False)
    assert F.scaled_dot_product_attention is orig and sparge.functional._observer is None

    def float_mask(x):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(q.shape[2], q.shape[2]))

    res = calibrate(float_mask, [0], progress=False)
    assert len(res.config) == 0 and sum(res.skipped.values()) == 1
    res = calibrate(VideoAttentionModel(2, 2, 16, 16, 2), [0, 1], max_calls_per_layer=1, progress=False,
                    layers=lambda p: p == "blocks.1.attn")
    assert list(res.config) == ["blocks.1.attn"] and len(res.records) == 1
    assert res.skipped == {"filtered out by layers": 2, "max_calls_per_layer reached": 1}


BAD = [
    (dict(target=0.0), "target"),
    (dict(target=float("nan")), "target"),
    (dict(metric="l2"), "metric"),
    (dict(mode="both"), "mode"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(sim_candidates=()), "sim_candidates"),
    (dict(sim_candidates="best"), "sim_candidates"),
    (dict(pv_candidates=(-1.0,)), "pv_candidates"),
    (dict(pv_share=1.0), "pv_share"),
]


@pytest.mark.parametrize("kw,needle", BAD, ids=[b[1] + str(i) for i, b in enumerate(BAD)])
def test_bad_arguments(kw, needle):
    q, k, v = make_video_qkv(1, 8, 8, heads=1, head_dim=32)
    with pytest.raises(ValueError, match=needle):
        calibrate_layer(q, k, v, **kw)


def test_bad_model():
    with pytest.raises(TypeError, match="model"):
        calibrate(3, [0])
    with pytest.raises(ValueError, match="max_calls_per_layer"):
        calibrate(lambda x: x, [0], max_calls_per_layer=0)


def test_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from sparge import viz

    res = calibrate(VideoAttentionModel(2, 2, 16, 16, 2), [0], progress=False)
    for fn, name in ((viz.plot_density, "d.png"), (viz.plot_tradeoff, "t.png")):
        fn(res, path=tmp_path / name)
        assert (tmp_path / name).stat().st_size > 5000
    q, k, _ = make_video_qkv(2, 16, 16, heads=2, head_dim=64)
    viz.plot_block_mask(sparge.predict(q, k, topk=0.3), head=1, path=tmp_path / "m.png")
    assert (tmp_path / "m.png").stat().st_size > 2000
    with pytest.raises(ValueError, match="head"):
        viz.plot_block_mask(sparge.predict(q, k, topk=0.3), head=5)


def test_calibrate_demo_cli(tmp_path):
    pytest.importorskip("matplotlib")
    r = subprocess.run([sys.executable, "-m", "sparge", "calibrate-demo", "--out", str(tmp_path), "--device", "cpu",
                        "--layers", "2", "--heads", "2", "--grid", "2", "16", "16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("sparge_config.json", "mask_layer0_head0.png", "density.png", "tradeoff.png"):
        assert (tmp_path / name).exists(), name
    assert "held-out" in r.stdout
    cfg = sparge.SpargeConfig.load(tmp_path / "sparge_config.json")
    assert len(cfg) == 2 and all(not math.isnan(x) for x in cfg["blocks.0.attn"].cdf_threshold)


@pytest.mark.cuda
def test_calibrate_layer_cuda():
    q, k, v = make_video_qkv(8, 24, 24, heads=4, head_dim=64, device="cuda", dtype=torch.bfloat16)
    rec = calibrate_layer(q, k, v, target=0.05)
    assert torch.all(rec.error <= 0.05) and rec.density.mean() < 0.6
    out = sparge.attn(q, k, v, config=rec.layer_config(), auto_dense=False)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert torch.all(_rel_l1_per_head(out, ref) <= 0.055)
    # same on the CPU backend within the error target's resolution
    lc = rec.layer_config()
    assert isinstance(lc, LayerConfig) and lc.num_heads == 4


def test_bench_calibrate_tiny(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_calibrate.py"), "--tiny", "--device", "cpu",
                        "--csv", str(tmp_path / "c.csv")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibration wall time" in r.stdout
    lines = (tmp_path / "c.csv").read_text().splitlines()
    assert len(lines) == 3 and "heldout_density" in lines[0]


def test_dense_above_writes_dense_layers():
    model = VideoAttentionModel(layers=2, T=2, Hs=16, Ws=16, heads=2)
    res = calibrate(model, [0], dense_above=0.0, progress=False)
    assert all(res.config[p] == LayerConfig(topk=1.0, num_heads=2) for p in res.config)
    # a dense layer is exact
    q, k, v = make_video_qkv(2, 16, 16, heads=2, head_dim=64)
    out = sparge.attn(q, k, v, config=res.config["blocks.0.attn"])
    assert torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5)
    # "auto" keeps sparse layers on the CPU
    assert calibrate(model, [0], progress=False).config["blocks.0.attn"].selection == "cdf"
    with pytest.raises(ValueError, match="dense_above"):
        calibrate(model, [0], dense_above=2.0)
