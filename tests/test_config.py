"""SpargeConfig / LayerConfig: validation, JSON round trip, use by sparge.attn."""
import json

import pytest
import torch
import torch.nn.functional as F

import sparge
from sparge import ConfigError, LayerConfig, SpargeConfig
from sparge.demo import make_video_qkv


def _cfg():
    return SpargeConfig(
        {"blocks.0.attn": LayerConfig(sim_threshold=[0.3, 0.5], cdf_threshold=[0.9, 0.95], pv_threshold=[None, 8.0]),
         "blocks.1.attn": LayerConfig(sim_threshold=-0.1, topk=[0.25, 1.0])},
        default=LayerConfig(topk=0.5), metadata={"model": "tiny"})


def test_round_trip(tmp_path):
    cfg = _cfg()
    path = tmp_path / "c.json"
    cfg.save(path)
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == 1 and raw["format"] == "sparge.SpargeConfig"
    assert raw["layers"]["blocks.0.attn"]["pv_threshold"] == [None, 8.0]
    back = SpargeConfig.load(path, num_heads={"blocks.0.attn": 2, "blocks.1.attn": 2})
    assert back == cfg
    assert back.layer("blocks.0.attn").cdf_threshold == (0.9, 0.95)
    assert back.layer("other.attn") == LayerConfig(topk=0.5)
    assert SpargeConfig().layer("x") is None


BAD_FILES = [
    ("not json", "{", "not valid JSON"),
    ("top level list", "[]", "top level"),
    ("wrong format", '{"format": "x", "schema_version": 1}', "format"),
    ("future schema", '{"format": "sparge.SpargeConfig", "schema_version": 99}', "schema_version 99"),
    ("string version", '{"format": "sparge.SpargeConfig", "schema_version": "1"}', "schema_version"),
    ("unknown key", '{"format": "sparge.SpargeConfig", "schema_version": 1, "extra": 1}', "extra"),
    ("layers not object", '{"format": "sparge.SpargeConfig", "schema_version": 1, "layers": []}', "layers"),
    ("topk out of range", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                          '"layers": {"a": {"topk": 1.5}}}', "topk"),
    ("cdf zero", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                 '"layers": {"a": {"cdf_threshold": [0.9, 0.0]}}}', "head 1"),
    ("negative pv", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                    '"layers": {"a": {"pv_threshold": -1}}}', "pv_threshold"),
    ("NaN", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
            '"layers": {"a": {"sim_threshold": NaN}}}', "NaN"),
    ("string value", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                     '"layers": {"a": {"sim_threshold": "0.5"}}}', "sim_threshold"),
    ("null sim per head", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                          '"layers": {"a": {"sim_threshold": [0.1, null]}}}', "sim_threshold[1]"),
    ("both selections", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                        '"layers": {"a": {"topk": 0.5, "cdf_threshold": 0.9}}}', "either"),
    ("lengths differ", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                       '"layers": {"a": {"sim_threshold": [0.1, 0.2], "topk": [0.5]}}}', "differ"),
    ("unknown field", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                      '"layers": {"a": {"simthreshold": 0.1}}}', "simthreshold"),
    ("num_heads mismatch", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                           '"layers": {"a": {"num_heads": 3, "topk": [0.5, 0.5]}}}', "num_heads"),
    ("empty key", '{"format": "sparge.SpargeConfig", "schema_version": 1, '
                  '"layers": {"": {"topk": 0.5}}}', "module paths"),
]


@pytest.mark.parametrize("text,needle", [(t, n) for _, t, n in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_files_raise(tmp_path, text, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        SpargeConfig.load(path)
    assert needle in str(e.value) and "bad.json" in str(e.value)


def test_head_count_and_paths_checked_against_model(tmp_path):
    cfg = _cfg()
    path = tmp_path / "c.json"
    cfg.save(path)
    with pytest.raises(ConfigError, match="3 query heads"):
        SpargeConfig.load(path, num_heads={"blocks.0.attn": 3, "blocks.1.attn": 2})
    with pytest.raises(ConfigError, match="not attention modules"):
        SpargeConfig.load(path, num_heads={"blocks.0.attn": 2})


def test_layer_config_is_immutable_and_hashable():
    lc = LayerConfig(topk=[0.5, 0.25])
    with pytest.raises(AttributeError):
        lc.topk = 0.1
    assert lc == LayerConfig(topk=(0.5, 0.25)) and hash(lc) == hash(LayerConfig(topk=(0.5, 0.25)))
    assert LayerConfig(topk=torch.tensor([0.5, 0.25])) == lc
    assert lc.num_heads == 2 and lc.selection == "topk"


def test_attn_uses_layer_config_per_head():
    q, k, v = make_video_qkv(4, 16, 16, heads=2, head_dim=32)
    lc = LayerConfig(sim_threshold=[-0.1, -0.1], topk=[1.0, 0.2], pv_threshold=[None, None])
    out, st = sparge.attn(q, k, v, config=lc, return_stats=True)
    want, st2 = sparge.attn(q, k, v, topk=torch.tensor([1.0, 0.2]), return_stats=True)
    assert torch.equal(out, want) and torch.equal(st["blocks_kept"], st2["blocks_kept"])
    assert st["density"][0, 0] == 1.0 and st["density"][0, 1] < 0.5
    # head 0 is dense: equals SDPA there
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out[:, 0] - ref[:, 0]).abs().max() < 1e-5
    # a single-layer SpargeConfig or a default-only one is accepted too
    assert torch.equal(sparge.attn(q, k, v, config=SpargeConfig({"a": lc})), out)
    assert torch.equal(sparge.attn(q, k, v, config=SpargeConfig(default=lc)), out)


def test_attn_config_errors():
    q, k, v = make_video_qkv(2, 8, 8, heads=2, head_dim=32)
    with pytest.raises(ConfigError, match="3 heads"):
        sparge.attn(q, k, v, config=LayerConfig(topk=[0.5, 0.5, 0.5]))
    with pytest.raises(ConfigError, match="config.layer"):
        sparge.attn(q, k, v, config=_cfg())
    with pytest.raises(TypeError, match="config"):
        sparge.attn(q, k, v, config=3)
    with pytest.raises(ValueError, match="config: unknown keys"):
        sparge.attn(q, k, v, config={"top_k": 0.5})


def test_pv_threshold_per_head_off():
    q, k, v = make_video_qkv(4, 16, 16, heads=2, head_dim=32)
    lc = LayerConfig(topk=1.0, pv_threshold=[None, 0.0])
    _, st = sparge.attn(q, k, v, config=lc, return_stats=True)
    assert st["pv_skipped"][0, 0] == 0 and st["pv_skipped"][0, 1] > 0


def test_layer_config_under_torch_compile():
    q, k, v = make_video_qkv(2, 16, 16, heads=2, head_dim=64)
    lc = LayerConfig(sim_threshold=[-0.1, 0.2], cdf_threshold=[0.9, 0.95], pv_threshold=[None, 6.0])
    f = torch.compile(lambda q, k, v: sparge.attn(q, k, v, config=lc), fullgraph=True)
    assert torch.equal(f(q, k, v), sparge.attn(q, k, v, config=lc))


def test_binary_file_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\xff\xfe\x00\x01\x80binary")
    with pytest.raises(ConfigError, match="weights.bin: not a UTF-8 text file"):
        SpargeConfig.load(path)


def test_deeply_nested_file_is_a_config_error_naming_the_file(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(ConfigError, match="deep.json: JSON nested too deeply"):
        SpargeConfig.load(path)


def test_config_dict_with_topk_and_cdf_threshold_raises():
    q = torch.randn(1, 2, 64, 32)
    with pytest.raises(ConfigError, match="either topk or cdf_threshold"):
        sparge.attn(q, q, q, config={"topk": 0.5, "cdf_threshold": 0.9})
    # one of them alone is fine
    sparge.attn(q, q, q, config={"cdf_threshold": 0.9})
