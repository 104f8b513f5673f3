"""Fallbacks trace (issue 13, item 7): a call that sparge hands to torch SDPA
inside ``torch.compile(fullgraph=True)`` traces with no graph break (no lock,
no warning in traced code) and gives the eager result; eager calls still count."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import sparge


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    sparge.reset_fallback_counts()
    yield
    torch._dynamo.reset()


def _qkv(L=40, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, L, D, generator=g) for _ in range(3)]


def _float_mask(L=40, seed=1):
    return torch.randn(L, L, generator=torch.Generator().manual_seed(seed))


def test_attn_fallback_compiles_fullgraph_and_counts_only_eager():
    q, k, v = _qkv()
    m = _float_mask()

    def fn(q, k, v, m):
        return sparge.attn(q, k, v, attn_mask=m, topk=1.0)

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        eager = fn(q, k, v, m)
    assert any("float attn_mask" in str(x.message) for x in w)
    counts = sparge.fallback_counts()
    assert sum(counts.values()) == 1 and "float attn_mask" in next(iter(counts))
    compiled = torch.compile(fn, fullgraph=True)(q, k, v, m)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(eager, F.scaled_dot_product_attention(q, k, v, attn_mask=m))
    # the traced fallback has no side effect: the eager count is unchanged
    assert sparge.fallback_counts() == counts


def test_attn_dropout_fallback_compiles_fullgraph():
    """dropout_p > 0 falls back to SDPA's dropout (random: only the tracing and the shape are checked)."""
    q, k, v = _qkv()
    fn = torch.compile(lambda q, k, v: sparge.attn(q, k, v, dropout_p=0.5), fullgraph=True)
    out = fn(q, k, v)
    assert out.shape == q.shape and torch.isfinite(out).all()


def test_attn_not_supported_fallback_compiles_fullgraph():
    """A NOT_SUPPORTED kernel (int8 on the CPU) is found without raising
    sparge's exception classes, which Dynamo cannot build (a graph break)."""
    q, k, v = _qkv()

    def fn(q, k, v):
        return sparge.attn(q, k, v, is_causal=True, precision="int8")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = fn(q, k, v)
    assert any("int8" in key for key in sparge.fallback_counts())
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(q, k, v), eager, atol=1e-6, rtol=1e-5)
    # predict's block shape lookup takes the same path
    pf = torch.compile(lambda q, k: sparge.predict(q, k, precision="int8"), fullgraph=True)
    assert torch.equal(pf(q, k), sparge.predict(q, k, precision="int8"))


def test_patch_sdpa_fallback_compiles_fullgraph():
    q, k, v = _qkv()
    m = _float_mask()

    def fn(q, k, v, m):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    with sparge.patch_sdpa(topk=1.0):
        eager = fn(q, k, v, m)
        compiled = torch.compile(fn, fullgraph=True)(q, k, v, m)
    assert any(key.startswith("patch_sdpa: float attention masks") for key in sparge.fallback_counts())
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def test_transformers_fallback_compiles_fullgraph():
    """A tiny Llama fed a 4-D float mask (transformers' SDPA function runs it)
    under torch.compile(fullgraph=True): same logits as eager, no exception."""
    transformers = pytest.importorskip("transformers")
    from sparge.integrations import transformers as stf

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    L = 20
    ids = torch.randint(3, 96, (2, L), generator=torch.Generator().manual_seed(2))
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    fmask = torch.zeros(2, 1, L, L).masked_fill(~causal, torch.finfo(torch.float32).min)
    stf.register()
    model.set_attn_implementation("sparge")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = model(input_ids=ids, attention_mask=fmask).logits
            counts = sparge.fallback_counts()
            assert any("not a boolean" in key for key in counts), counts
            compiled = torch.compile(model, fullgraph=True)(input_ids=ids, attention_mask=fmask).logits
        torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
        assert sparge.fallback_counts() == counts
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("name", ["flux", "cogvideox"])
def test_diffusers_fallback_compiles_fullgraph(name):
    """Every attention call of a tiny model falls back inside sparge.attn
    (precision='int8' has no CPU kernel): through the dispatcher backend
    (Flux) and through the routed SDPA processors (CogVideoX), traced with no
    graph break, equal to eager."""
    pytest.importorskip("diffusers")
    from test_integrations_diffusers import MODELS, _run

    from sparge.integrations import diffusers as sdf

    m, kw, _ = MODELS[name]()
    sdf.apply(m, precision="int8")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eager = _run(m, kw)
            counts = sparge.fallback_counts()
            assert any("int8" in key for key in counts), counts
            with torch.no_grad():
                expl = torch._dynamo.explain(m)(**kw)
                assert expl.graph_break_count == 0, [str(r.reason)[:200] for r in expl.break_reasons]
                compiled = torch.compile(m, fullgraph=True)(**kw)[0]
        torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
        assert sparge.fallback_counts() == counts
    finally:
        sdf.remove(m)
