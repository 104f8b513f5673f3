"""sparge in a HuggingFace causal LM: attn_implementation="sparge", a per-layer
config, and batched (left-padded) generation with a KV cache.

    python examples/transformers_llm.py                  # tiny random Llama with GQA, no download
    python examples/transformers_llm.py --model Qwen/Qwen2.5-0.5B-Instruct --prompt-len 2048
"""
import argparse

import torch
import transformers

import sparge
from sparge.integrations import transformers as sparge_tf

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", help="a checkpoint name or path (default: a tiny random Llama built from a config)")
p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids; long prompts are sparse)")
p.add_argument("--new-tokens", type=int, default=8)
p.add_argument("--topk", type=float, default=0.25, help="fraction of key blocks kept per query block")
args = p.parse_args()

device = "cuda" if sparge.cuda_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
if args.model:
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
else:
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype)
model = model.to(device).eval()
pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
model.generation_config.pad_token_id = pad_id

# a batch of two prompts, the second left-padded by a quarter
g = torch.Generator().manual_seed(0)
ids = torch.randint(10, min(model.config.vocab_size, 32000), (2, args.prompt_len), generator=g)
mask = torch.ones_like(ids)
mask[1, : args.prompt_len // 4] = 0
ids[1, : args.prompt_len // 4] = pad_id
batch = dict(input_ids=ids.to(device), attention_mask=mask.to(device))
gen = dict(max_new_tokens=args.new_tokens, do_sample=False)

# 1. reference: torch SDPA
model.set_attn_implementation("sdpa")
with torch.no_grad():
    ref_logits = model(**batch).logits.float()
    ref_tokens = model.generate(**batch, **gen)

# 2. sparge with topk=1.0 is dense attention: same logits, same tokens
sparge_tf.apply(model, topk=1.0)
with torch.no_grad():
    logits = model(**batch).logits.float()
    tokens = model.generate(**batch, **gen)
valid = mask.to(device).bool()
err = (logits - ref_logits).abs()[valid].max().item() / ref_logits.abs().max().item()
same = (tokens == ref_tokens).float().mean().item()
print(f"topk=1.0: max |sparge - sdpa| / max |sdpa| = {err:.2e}, generated tokens equal: {same:.0%}")

# 3. sparse, per layer: the first layer dense, the others keep `topk` of their blocks.
#    (A calibrated config comes from sparge.calibrate and SpargeConfig.load.)
first = next(n for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
config = sparge.SpargeConfig({first: sparge.LayerConfig(topk=1.0)},
                             default=sparge.LayerConfig(sim_threshold=-0.1, topk=args.topk))
sparge_tf.apply(model, config=config, record_stats=True)
with torch.no_grad():
    logits = model(**batch).logits.float()
    tokens = model.generate(**batch, **gen)
stats = sparge_tf.density(model)
rel = ((logits - ref_logits).abs()[valid].sum() / ref_logits.abs()[valid].sum()).item()
print(f"sparse: density {stats['total']['density']:.3f} over {stats['total']['calls']} attention calls, "
      f"relative L1 of the logits {rel:.3f}, tokens equal to dense: {(tokens == ref_tokens).float().mean():.0%}")
for path in (first, next(p for p in stats if p not in (first, "total"))):
    print(f"  {path}: density {stats[path]['density']:.3f}")

# 4. back to the model's previous attention
sparge_tf.remove(model)
print(f"removed: attn_implementation = {model.config._attn_implementation!r}")

# Loading straight into sparge attention works too, once registered:
#   sparge_tf.register(topk=0.25)
#   model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="sparge")
