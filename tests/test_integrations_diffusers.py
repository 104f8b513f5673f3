"""diffusers integration: the "sparge" backend and processor routing on tiny
Flux, Wan and CogVideoX transformers built from configs (random weights).

topk=1.0 is dense attention, so outputs equal diffusers' native backend (fp32
on the CPU: to rounding); sparse settings must run and report a density below
1 on sequences of several blocks; remove() must give back bit-identical outputs.
"""
import threading

import pytest
import torch
import torch.nn.functional as F

diffusers = pytest.importorskip("diffusers")

import sparge  # noqa: E402
from sparge.integrations import diffusers as sdf  # noqa: E402
from sparge.integrations import fallback_counts, reset_fallback_counts  # noqa: E402
from sparge.integrations import sdpa as ssdpa  # noqa: E402

ATOL = 2e-5


@pytest.fixture(autouse=True)
def _clean():
    reset_fallback_counts()
    sparge.reset_fallback_counts()
    yield
    assert not ssdpa.is_patched(), "an SDPA routing scope leaked"


def _close(a, b, what, atol=ATOL):
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"{what}: max |sparge - native| = {err:.3g} > {atol:.1g} ({err / atol:.1f}x the tolerance)"


def _no_fallbacks():
    assert fallback_counts() == {}, f"integration fell back: {fallback_counts()}"
    assert sparge.fallback_counts() == {}, f"sparge.attn fell back: {sparge.fallback_counts()}"


# --------------------------------------------------------------------------
# Tiny models and their inputs
# --------------------------------------------------------------------------
def flux(side=8, text=5, device="cpu", dtype=torch.float32, head_dim=16):
    torch.manual_seed(0)
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)
    m = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                         attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=16, axes_dims_rope=rope).eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(side, side, 3)
    ids[..., 1] = torch.arange(side)[:, None]
    ids[..., 2] = torch.arange(side)[None, :]
    kw = dict(hidden_states=torch.randn(1, side * side, 8, generator=g),
              encoder_hidden_states=torch.randn(1, text, 32, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
              img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(text, 3), return_dict=False)
    kw = {k: v.to(device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
          if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return m, kw, (side, side)


def wan(frames=3, side=8, device="cpu", dtype=torch.float32, head_dim=16):
    torch.manual_seed(0)
    m = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=head_dim,
                                        in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                                        num_layers=1, rope_max_seq_len=64).eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, 4, frames, side, side, generator=g).to(device, dtype),
              timestep=torch.tensor([10], device=device),
              encoder_hidden_states=torch.randn(1, 7, 32, generator=g).to(device, dtype), return_dict=False)
    return m, kw, (frames, side // 2, side // 2)


def cogvideox(frames=3, side=8, device="cpu", dtype=torch.float32, head_dim=16):
    torch.manual_seed(0)
    m = diffusers.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=head_dim, in_channels=4,
                                              out_channels=4, time_embed_dim=8, text_embed_dim=32, num_layers=1,
                                              sample_width=side, sample_height=side, sample_frames=4 * frames - 3,
                                              patch_size=2, max_text_seq_length=7,
                                              temporal_compression_ratio=4).eval().to(device, dtype)
    g = torch.Generator().manual_seed(1)
    kw = dict(hidden_states=torch.randn(1, frames, 4, side, side, generator=g).to(device, dtype),
              encoder_hidden_states=torch.randn(1, 7, 32, generator=g).to(device, dtype),
              timestep=torch.tensor([10], device=device), return_dict=False)
    return m, kw, (frames, side // 2, side // 2)


MODELS = {"flux": flux, "wan": wan, "cogvideox": cogvideox}


def _run(m, kw):
    with torch.no_grad():
        return m(**kw)[0]


# --------------------------------------------------------------------------
# Backend registration
# --------------------------------------------------------------------------
def test_backend_enum_extended_and_registered():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    member = sdf.register()
    assert sdf.register() is member  # idempotent
    assert AttentionBackendName("sparge") is member and AttentionBackendName["SPARGE"] is member
    assert "sparge" in {x.value for x in AttentionBackendName.__members__.values()}
    assert _AttentionBackendRegistry._backends[member] is sdf.sparge_backend
    assert AttentionBackendName("native").value == "native"  # the rest of the enum is intact


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_equals_native_and_remove_restores(name):
    m, kw, grid = MODELS[name]()
    ref = _run(m, kw)
    sdf.apply(m, topk=1.0, record_stats=True)
    out = _run(m, kw)
    d = sdf.density(m)
    sdf.remove(m)
    back = _run(m, kw)
    _no_fallbacks()
    _close(out, ref, f"{name}: topk=1.0 vs native")
    assert torch.equal(back, ref), f"{name}: remove() did not restore identical outputs"
    assert d["total"]["density"] == 1.0 and d["total"]["calls"] >= 1, d
    assert all(p == "total" or ".attn" in p for p in d), d


@pytest.mark.parametrize("name", sorted(MODELS))
def test_dense_with_hilbert_equals_native(name, monkeypatch):
    m, kw, grid = MODELS[name]()
    ref = _run(m, kw)
    from sparge import hilbert

    calls = []
    orig = hilbert.reorder

    def spy(x, g, **k):
        calls.append((tuple(g), k.get("offset")))
        return orig(x, g, **k)

    monkeypatch.setattr(hilbert, "reorder", spy)
    for g in ("auto", grid):
        calls.clear()
        sdf.apply(m, hilbert_grid=g, topk=1.0)
        out = _run(m, kw)
        sdf.remove(m)
        _close(out, ref, f"{name}: topk=1.0 with Hilbert grid {g}")
        assert calls and all(c[0] == grid for c in calls), calls
    _no_fallbacks()
    if name in ("flux", "cogvideox"):  # text first: the visual tokens start after the text
        assert any(off > 0 for _, off in calls), calls


def test_shared_processor_restored():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    m, kw, _ = flux()
    shared = FluxAttnProcessor()
    m.set_attn_processor(shared)
    ref = _run(m, kw)
    sdf.apply(m, topk=1.0)
    assert shared._attention_backend == sdf.backend_member()
    sdf.remove(m)
    assert "_attention_backend" not in shared.__dict__ and shared._attention_backend is None
    assert torch.equal(_run(m, kw), ref)


def test_backend_switches_without_apply():
    from diffusers.models.attention_dispatch import attention_backend

    m, kw, _ = flux()
    ref = _run(m, kw)
    sdf.register(topk=1.0)
    try:
        with attention_backend("sparge"):
            out_ctx = _run(m, kw)
        m.set_attention_backend("sparge")
        out_set = _run(m, kw)
    finally:
        sdf.remove(m)
        sdf.register(topk=0.5)
    assert torch.equal(_run(m, kw), ref), "remove() left the sparge backend active"
    _close(out_ctx, ref, "attention_backend('sparge')")
    _close(out_set, ref, "set_attention_backend('sparge')")


def _sparse_setting(name):
    if name == "flux":
        return flux(side=24)
    if name == "wan":
        return wan(frames=4, side=32)
    return cogvideox(frames=4, side=32)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sparse_runs_and_reports_density(name):
    m, kw, grid = _sparse_setting(name)
    ref = _run(m, kw)
    sdf.apply(m, hilbert_grid=grid, sim_threshold=-1.0, topk=0.3, pv_threshold=8.0, record_stats=True)
    out = _run(m, kw)
    d = sdf.density(m)
    sdf.remove(m)
    assert torch.isfinite(out).all()
    assert 0.0 < d["total"]["density"] < 0.9, d
    rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
    assert rel < 0.5, f"{name}: relative L1 {rel:.3f} of the sparse output against native"
    assert torch.equal(_run(m, kw), ref)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_compile_fullgraph(name):
    """Sparse attention traced without graph breaks, CogVideoX's routed
    processors included: compiled output equals eager sparge output."""
    import torch._dynamo

    m, kw, grid = _sparse_setting(name)
    native = _run(m, kw)
    sdf.apply(m, hilbert_grid=grid, sim_threshold=-1.0, topk=0.3, pv_threshold=8.0)
    try:
        eager = _run(m, kw)
        torch._dynamo.reset()
        with torch.no_grad():
            expl = torch._dynamo.explain(m)(**kw)
            assert expl.graph_break_count == 0, [str(r.reason)[:200] for r in expl.break_reasons]
            compiled = torch.compile(m, fullgraph=True)(**kw)[0]
        _close(compiled, eager, f"{name}: compiled vs eager", atol=1e-4)
        assert (eager - native).abs().max() > 1e-3, "the sparse setting changed nothing: did sparge run?"
        _no_fallbacks()
    finally:
        sdf.remove(m)
        torch._dynamo.reset()


def test_layer_config_by_module_path():
    m, kw, grid = wan(frames=4, side=32)
    cfg = sparge.SpargeConfig({"blocks.0.attn1": sparge.LayerConfig(sim_threshold=1.0, topk=0.1)},
                              default=sparge.LayerConfig(sim_threshold=-1.0, topk=0.1))
    sdf.apply(m, config=cfg, record_stats=True)
    _run(m, kw)
    d = sdf.density(m)
    sdf.remove(m)
    assert d["blocks.0.attn1"]["density"] == 1.0, d   # nothing is self-similar above 1: all computed
    assert "blocks.0.attn2" in d  # cross-attention, default config


def test_cogvideox_processor_is_routed_not_replaced():
    """CogVideoX calls F.scaled_dot_product_attention itself: the router is
    installed while the model is applied, calls are routed inside the module's
    forward only, and the processor stays the same object."""
    m, kw, _ = cogvideox()
    procs = {n: p for n, p in m.attn_processors.items()}
    sdf.apply(m, topk=1.0, record_stats=True)
    assert {n: p for n, p in m.attn_processors.items()} == procs
    assert ssdpa.is_patched()
    _run(m, kw)
    calls = sdf.density(m)["total"]["calls"]
    assert calls > 0
    q = torch.randn(1, 2, 64, 16)
    assert torch.equal(F.scaled_dot_product_attention(q, q, q), ssdpa.original_sdpa()(q, q, q))
    assert sdf.density(m)["total"]["calls"] == calls  # outside the model: not routed
    sdf.remove(m)
    assert not ssdpa.is_patched()


def test_routing_scope_closed_when_forward_raises():
    m, kw, _ = cogvideox()
    sdf.apply(m, topk=1.0)
    attn = m.transformer_blocks[0].attn1
    bad = torch.randn(1, 5, 7)  # wrong hidden size
    with pytest.raises(RuntimeError):
        attn(bad, bad)
    assert ssdpa._stack() == [], "the module's routing scope stayed open"
    sdf.remove(m)
    assert not ssdpa.is_patched()


def test_threads_share_a_model():
    m, kw, _ = wan()
    ref = _run(m, kw)
    sdf.apply(m, topk=1.0)
    outs, errors = [], []

    def work():
        try:
            for _ in range(3):
                outs.append(_run(m, kw))
        except Exception as e:  # surfaced below
            errors.append(e)

    ts = [threading.Thread(target=work) for _ in range(3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    sdf.remove(m)
    assert not errors, errors
    for o in outs:
        _close(o, ref, "threaded forward")


def test_calibrate_then_apply_by_module_path():
    """sparge.calibrate records the Attention modules' paths, which apply() looks up."""
    m, kw, grid = wan(side=16)
    res = sparge.calibrate(m, [kw], progress=False)
    assert sorted(res.config) == ["blocks.0.attn1", "blocks.0.attn2"] and not res.skipped
    sdf.apply(m, config=res.config, record_stats=True)
    try:
        _run(m, kw)
        dens = sdf.density(m)
        assert {"blocks.0.attn1", "blocks.0.attn2"} <= set(dens)
        _no_fallbacks()
    finally:
        sdf.remove(m)


def test_bad_arguments():
    m, _, _ = wan()
    with pytest.raises(TypeError, match="toppk"):
        sdf.apply(m, toppk=0.2)
    with pytest.raises(ValueError, match="hilbert_grid"):
        sdf.apply(m, hilbert_grid=(0, 4))
    with pytest.raises(ValueError, match="hilbert_grid"):
        sdf.apply(m, hilbert_grid="hilbert")
    with pytest.raises(TypeError, match="model"):
        sdf.apply(object())
    with pytest.raises(ValueError, match="attention modules"):
        sdf.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="text_first"):
        sdf.apply(m, text_first="yes")


# --------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_dense_close_to_native(name):
    """Sparge's GPU kernels (auto_dense off, head dim 64) against diffusers' native backend, bf16."""
    gpu = dict(device="cuda", dtype=torch.bfloat16, head_dim=64)
    builders = {"flux": lambda: flux(side=24, **gpu), "wan": lambda: wan(frames=4, side=32, **gpu),
                "cogvideox": lambda: cogvideox(frames=4, side=32, **gpu)}
    m, kw, grid = builders[name]()
    ref = _run(m, kw).float()
    sdf.apply(m, hilbert_grid=grid, topk=1.0, auto_dense=False)
    out = _run(m, kw).float()
    sdf.apply(m, hilbert_grid=grid, topk=0.3, sim_threshold=-1.0, auto_dense=False, record_stats=True)
    sparse = _run(m, kw).float()
    d = sdf.density(m)["total"]["density"]
    sdf.remove(m)
    back = _run(m, kw).float()
    _no_fallbacks()
    _close(out, ref, f"{name} GPU bf16", atol=0.03 * ref.abs().max().item())
    assert torch.isfinite(sparse).all() and 0.0 < d < 0.9, d
    assert torch.equal(back, ref)
