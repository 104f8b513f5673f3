"""sparge in a diffusers video transformer: one line, with Hilbert token order
and a per-layer config.

    python examples/diffusers_video.py                   # tiny random Wan transformer, no download
    python examples/diffusers_video.py --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers --config wan.sparge.json
"""
import argparse

import diffusers
import torch

import sparge
from sparge.integrations import diffusers as sparge_df

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--model", help="a Wan checkpoint: runs the pipeline and writes --out (default: a tiny random "
                               "WanTransformer3DModel on random latents)")
p.add_argument("--config", help="a SpargeConfig JSON (from sparge.calibrate); default: the built-in one below")
p.add_argument("--frames", type=int, default=5, help="latent frames (tiny) / video frames (--model)")
p.add_argument("--size", type=int, default=32, help="latent side (tiny) / video side in pixels (--model)")
p.add_argument("--prompt", default="a red fox running through snow, cinematic")
p.add_argument("--out", default="sparge_video.mp4")
args = p.parse_args()

device = "cuda" if sparge.cuda_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32

# The first self-attention layer stays dense; elsewhere each query block keeps
# 30% of the key blocks (blocks whose tokens are not self-similar, sim <= 0, are
# always computed) and skips P.V where probabilities fall below 2^-10 of the row max.
config = sparge.SpargeConfig.load(args.config) if args.config else sparge.SpargeConfig(
    {"blocks.0.attn1": sparge.LayerConfig(topk=1.0)},
    default=sparge.LayerConfig(sim_threshold=0.0, topk=0.3, pv_threshold=10.0))

if args.model:
    pipe = diffusers.WanPipeline.from_pretrained(args.model, torch_dtype=dtype).to(device)
    # the grid is read from each forward's latents ("auto"); text tokens stay in place
    sparge_df.apply(pipe.transformer, config=config, hilbert_grid="auto", record_stats=True)
    frames = pipe(args.prompt, num_frames=args.frames, height=args.size, width=args.size).frames[0]
    diffusers.utils.export_to_video(frames, args.out, fps=16)
    print(f"wrote {args.out}; density {sparge_df.density(pipe.transformer)['total']['density']:.3f}")
    raise SystemExit

torch.manual_seed(0)
model = diffusers.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32,
                                        in_channels=4, out_channels=4, text_dim=64, freq_dim=64, ffn_dim=256,
                                        num_layers=2, rope_max_seq_len=256).eval().to(device)
if dtype != torch.float32:
    model = model.to(dtype)
# smooth random latents (low-frequency content, like real ones): neighbouring tokens are alike
coarse = torch.randn(1, 4, args.frames, 6, 6)
latents = torch.nn.functional.interpolate(coarse, size=(args.frames, args.size, args.size), mode="trilinear")
latents = (latents + 0.05 * torch.randn_like(latents)).to(device, dtype)
text = torch.randn(1, 16, 64, device=device, dtype=dtype)
step = torch.tensor([500], device=device)
grid = (args.frames, args.size // 2, args.size // 2)  # visual tokens after the 1x2x2 patching
print(f"{grid[0] * grid[1] * grid[2]} video tokens in a {grid} grid, 16 text tokens")


def run():
    with torch.no_grad():
        return model(latents, step, text, return_dict=False)[0].float()


ref = run()  # diffusers' native attention

for label, grid_arg in (("raster order", None), ("Hilbert order", grid)):
    sparge_df.apply(model, config=config, hilbert_grid=grid_arg, record_stats=True)
    out = run()
    d = sparge_df.density(model)
    rel = ((out - ref).abs().sum() / ref.abs().sum()).item()
    print(f"{label:13s}: density {d['total']['density']:.3f} (self-attention of block 1: "
          f"{d['blocks.1.attn1']['density']:.3f}), PV skipped {d['total']['pv_skip_fraction']:.3f}, "
          f"relative L1 vs dense {rel:.4f}")

sparge_df.remove(model)
print(f"removed: output identical to native again: {torch.equal(run(), ref)}")

# The backend alone, through diffusers' own switches:
sparge_df.register(topk=1.0)
model.set_attention_backend("sparge")
print(f"set_attention_backend('sparge'), topk=1.0: max |diff| = {(run() - ref).abs().max().item():.2e}")
sparge_df.remove(model)
