"""sparge.patch_sdpa: scoped, per-thread routing of F.scaled_dot_product_attention."""
import threading

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge.integrations import fallback_counts, reset_fallback_counts
from sparge.integrations import sdpa as ssdpa

ORIGINAL = F.scaled_dot_product_attention


@pytest.fixture(autouse=True)
def _clean():
    reset_fallback_counts()
    sparge.reset_fallback_counts()
    yield
    assert F.scaled_dot_product_attention is ORIGINAL, "torch was left patched"


def _qkv(B=1, H=2, L=200, D=32, Hkv=None):
    return (torch.randn(B, H, L, D), torch.randn(B, Hkv or H, L, D), torch.randn(B, Hkv or H, L, D))


def test_restores_original_when_body_raises():
    with pytest.raises(KeyError):
        with sparge.patch_sdpa(topk=0.5):
            assert F.scaled_dot_product_attention is not ORIGINAL
            raise KeyError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL

    @sparge.patch_sdpa(topk=0.5)
    def failing():
        assert ssdpa.is_patched()
        raise ValueError("boom")

    with pytest.raises(ValueError):
        failing()
    assert F.scaled_dot_product_attention is ORIGINAL


def test_routes_supported_calls_to_sparge():
    q, k, v = _qkv()
    ref = ORIGINAL(q, k, v, is_causal=True)
    with sparge.patch_sdpa(topk=1.0, record_stats=True) as p:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        sparse = F.scaled_dot_product_attention(q, k, v, is_causal=False)
    err = (out - ref).abs().max().item()
    assert err < 2e-5, f"routed topk=1.0 differs from SDPA by {err:.3g}"
    assert p.stats.summary()["total"]["calls"] == 2
    assert p.density() == 1.0
    assert sparse.shape == q.shape
    # a sparse setting really is sparse
    q, k, v = _qkv(L=640)
    with sparge.patch_sdpa(topk=0.1, sim_threshold=-1.0, record_stats=True) as p:
        F.scaled_dot_product_attention(q, k, v)
    assert p.density() < 0.5


def test_gqa_and_key_padding_are_routed():
    q, k, v = _qkv(H=4, Hkv=2)
    pad = torch.ones(1, 1, 1, 200, dtype=torch.bool)
    pad[..., 150:] = False
    ref = ORIGINAL(q, k, v, attn_mask=pad, enable_gqa=True)
    with sparge.patch_sdpa(topk=1.0, record_stats=True) as p:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pad, enable_gqa=True)
    assert (out - ref).abs().max().item() < 2e-5
    assert p.stats.summary()["total"]["calls"] == 1
    assert fallback_counts() == {}


@pytest.mark.filterwarnings("ignore:sparge. patch_sdpa falls back:RuntimeWarning")
@pytest.mark.parametrize("what,call,needle", [
    ("float mask", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=torch.zeros(200, 200)),
     "float attention masks"),
    ("banded bool mask", lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.ones(200, 200, dtype=torch.bool).tril()), "other than key padding"),
    ("2-D inputs", lambda q, k, v: F.scaled_dot_product_attention(q[0, 0], k[0, 0], v[0, 0]), "rank >= 3"),
    ("float64", lambda q, k, v: F.scaled_dot_product_attention(q.double(), k.double(), v.double()), "dtypes"),
    ("gradients", lambda q, k, v: F.scaled_dot_product_attention(q.requires_grad_(), k, v), "gradients"),
])
def test_unsupported_calls_go_to_the_original(what, call, needle):
    q, k, v = _qkv()
    torch.manual_seed(0)
    with sparge.patch_sdpa(topk=0.1, record_stats=True) as p:
        out = call(q.clone(), k, v)
    torch.manual_seed(0)
    ref = call(q.clone(), k, v)  # unpatched: torch's own
    assert torch.equal(out, ref), what
    assert p.stats.summary() == {}, what
    assert any(needle in r for r in fallback_counts()), (what, fallback_counts())


@pytest.mark.filterwarnings("ignore:sparge. patch_sdpa falls back:RuntimeWarning")
def test_dropout_goes_to_the_original():
    q, k, v = _qkv()
    with sparge.patch_sdpa(record_stats=True) as p:
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    assert p.stats.summary() == {}
    assert any("dropout" in r for r in fallback_counts())


def test_sparge_fallback_inside_scope_does_not_recurse():
    """sparge's own fallback calls SDPA: inside a scope it must reach torch's."""
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning):
        with sparge.patch_sdpa(precision="int8"):  # no int8 kernel on the CPU: sparge falls back
            out = F.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(out, ORIGINAL(q, k, v), atol=1e-6)


def test_one_fallback_counter_for_sparge_and_the_integrations():
    assert fallback_counts is sparge.fallback_counts and reset_fallback_counts is sparge.reset_fallback_counts
    q, k, v = _qkv()
    with pytest.warns(RuntimeWarning):
        with sparge.patch_sdpa(topk=0.5):
            F.scaled_dot_product_attention(q, k, v, dropout_p=0.3)  # the router's fallback
        sparge.attn(q, k, v, precision="int8")  # sparge.attn's (no int8 kernel on the CPU)
    keys = sorted(sparge.fallback_counts())
    assert len(keys) == 2, keys
    assert keys[0].startswith("patch_sdpa: dropout") and keys[1].startswith("sparge.attn: "), keys
    reset_fallback_counts()
    assert sparge.fallback_counts() == {}


def test_calibrate_captures_through_the_router():
    """calibrate opens a router scope (it does not swap SDPA itself): only its
    thread's calls are captured, and the router is gone afterwards."""
    q, k, v = _qkv(L=128)
    seen = []

    def model(x):
        seen.append(ssdpa.is_patched())
        other = threading.Thread(target=lambda: F.scaled_dot_product_attention(q, k, v))
        other.start()
        other.join()
        return F.scaled_dot_product_attention(*x)

    res = sparge.calibrate(model, [[q, k, v]], progress=False, steps=2)
    assert seen == [True] and not ssdpa.is_patched()
    assert res.config.metadata["calls"] == {"attention.0": 1}


def test_nested_scopes_innermost_wins():
    q, k, v = _qkv(L=640)
    outer = sparge.patch_sdpa(topk=1.0, record_stats=True)
    inner = sparge.patch_sdpa(topk=0.1, sim_threshold=-1.0, record_stats=True)
    with outer:
        F.scaled_dot_product_attention(q, k, v)
        with inner:
            F.scaled_dot_product_attention(q, k, v)
        assert ssdpa.is_patched()
        F.scaled_dot_product_attention(q, k, v)
    assert outer.stats.summary()["total"]["calls"] == 2 and outer.density() == 1.0
    assert inner.stats.summary()["total"]["calls"] == 1 and inner.density() < 0.5


def test_reentrant_decorator():
    p = sparge.patch_sdpa(topk=1.0, record_stats=True)
    q, k, v = _qkv(L=64)

    @p
    def f(n):
        F.scaled_dot_product_attention(q, k, v)
        if n:
            f(n - 1)

    f(3)
    assert p.stats.summary()["total"]["calls"] == 4


def test_per_thread_routing_and_concurrent_scopes():
    """Scopes in several threads at once: each routes only its own calls, and
    torch is unpatched after the last one closes."""
    q, k, v = _qkv(L=64)
    inside = sparge.patch_sdpa(topk=1.0, record_stats=True)
    entered, release = threading.Event(), threading.Event()
    errors = []

    def scoped():
        try:
            with inside:
                entered.set()
                release.wait(30)
                for _ in range(5):
                    F.scaled_dot_product_attention(q, k, v)
        except Exception as e:  # surfaced below
            errors.append(e)

    def churn():
        try:
            for _ in range(50):
                with sparge.patch_sdpa(topk=1.0):
                    F.scaled_dot_product_attention(q, k, v)
        except Exception as e:
            errors.append(e)

    t = threading.Thread(target=scoped)
    t.start()
    assert entered.wait(30)
    # this thread has no scope: its call goes to torch even though the router is installed
    assert ssdpa.is_patched()
    F.scaled_dot_product_attention(q, k, v)
    churners = [threading.Thread(target=churn) for _ in range(3)]
    for c in churners:
        c.start()
    release.set()
    for c in churners + [t]:
        c.join()
    assert not errors, errors
    assert inside.stats.summary()["total"]["calls"] == 5


def test_bad_options():
    with pytest.raises(TypeError, match="toppk"):
        sparge.patch_sdpa(toppk=0.3)
    with pytest.raises(ValueError, match="topk"):
        sparge.patch_sdpa(topk=0.3, cdf_threshold=0.9)
    with pytest.raises(TypeError, match="config"):
        sparge.patch_sdpa(config={"topk": 0.3})
    with pytest.raises(RuntimeError, match="record_stats"):
        sparge.patch_sdpa().density()


@pytest.mark.cuda
def test_cuda_routed_close_to_sdpa():
    q, k, v = (torch.randn(1, 8, 2048, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = ORIGINAL(q, k, v, is_causal=True).float()
    with sparge.patch_sdpa(topk=1.0, auto_dense=False, record_stats=True) as p:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True).float()
    assert p.stats.summary()["total"]["calls"] == 1
    assert (out - ref).abs().max().item() < 0.03


# --------------------------------------------------------------------------
# The integration examples (test_api.py runs every example with defaults;
# here with small sizes, checking what they print)
# --------------------------------------------------------------------------
EXAMPLES = [
    ("transformers_llm.py", ["--prompt-len", "256", "--new-tokens", "3"],
     ["generated tokens equal: 100%", "removed: attn_implementation = 'sdpa'", "model.layers.0.self_attn: density 1.000"]),
    ("diffusers_video.py", ["--frames", "2", "--size", "16"],
     ["Hilbert order: density", "output identical to native again: True"]),
]


@pytest.mark.parametrize("script,args,needles", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_integration_example_output(script, args, needles):
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("transformers" if "transformers" in script else "diffusers")
    path = Path(__file__).resolve().parents[1] / "examples" / script
    assert len(path.read_text().splitlines()) < 100, f"{script} is 100 lines or more"
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for n in needles:
        assert n in r.stdout, f"{script}: {n!r} not in output:\n{r.stdout}"


def test_integrations_import_lazily():
    """import sparge (and its integration modules) imports neither transformers nor diffusers."""
    import subprocess
    import sys

    code = ("import sys, sparge, sparge.integrations.transformers, sparge.integrations.diffusers; "
            "print(sorted(m for m in ('transformers', 'diffusers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]", r.stdout
