"""The sampler's share of a full sampling run with a Stable-Diffusion-1.5-size UNet (random weights).

    python benchmarks/sampler_share.py --device cuda            # -> results/sampler_share_cuda.md
    python benchmarks/sampler_share.py --device cpu --tiny      # smoke test of the script itself

One image (batch 1, classifier-free guidance: the UNet sees 2 samples), 512x512 px
(64x64 latents), NFE 20, UniPC, fp16 on CUDA. The UNet is SD-1.5's architecture
(UNet2DConditionModel with SD-1.5's config, ~860M parameters) with random weights, since no
weights can be downloaded here; its cost does not depend on the weights.

Timed, interleaved and repeated (medians):
  run      ``fewstep.sample(unet, ...)``: the whole loop (UNet calls, guidance, solver updates, checks)
  model    the same loop with the solver removed: the UNet calls on the doubled batch only
and both again as captured CUDA graphs (``graph=True``; the model loop captured the same way).
The sampler's share is (run - model) / run. Goal (issue 12): < 1% at batch 1 with graph capture.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, cross_attention_dim=768,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
TINY_UNET = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=32,
    block_out_channels=(32, 64), attention_head_dim=4, norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)


class UNetModel:
    """``model(x, t, cond)`` -> the UNet's noise prediction."""

    def __init__(self, unet):
        self.unet = unet

    @torch.no_grad()
    def __call__(self, x, t, cond):
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def model_loop(model, x, ts, cond):
    """The run without the solver: the UNet on the doubled batch at every step."""
    for i in range(len(ts)):
        t = ts[i].expand(x.shape[0])
        out = model(torch.cat([x, x]), t.repeat(2), cond)
    return out


def timed(fn, device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny UNet (smoke test)")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    import fewstep
    from fewstep.samplers.capture import clear_graphs

    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    config = TINY_UNET if args.tiny else SD15_UNET
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).to(device, dtype).eval()
    model = UNetModel(unet)
    size, width = config["sample_size"], config["cross_attention_dim"]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 4, size, size, generator=g).to(device, dtype)
    cond = torch.randn(args.batch, 77, width, generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)
    plan = fewstep.make_plan("scaled_linear", "unipc", args.nfe)
    ts = plan.grid.model_timesteps.to(device=device, dtype=torch.float32)
    cond2 = torch.cat([uncond, cond])

    def run(graph=False):
        return fewstep.sample(model, x, plan=plan, guidance=7.5, cond=cond, uncond=uncond, graph=graph)

    methods = {"run (eager)": lambda: run(), "model (eager)": lambda: model_loop(model, x, ts, cond2)}
    if device.type == "cuda":
        static_x = x.clone()
        model_graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model_loop(model, static_x, ts, cond2)
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(model_graph):
            model_loop(model, static_x, ts, cond2)
        run(graph=True)  # capture
        methods["run (CUDA graph)"] = lambda: run(graph=True)
        methods["model (CUDA graph)"] = model_graph.replay
    for fn in methods.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(args.repeats):
        for k in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
            times[k].append(timed(methods[k], device))
    med = {k: statistics.median(v) for k, v in times.items()}
    clear_graphs()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    lines = [f"# Sampler share of a sampling run ({'tiny UNet' if args.tiny else 'SD-1.5-size UNet'}, {device.type})\n",
             f"`python benchmarks/sampler_share.py --device {args.device}{' --tiny' if args.tiny else ''}`: {name}, "
             f"torch {torch.__version__}, {str(dtype).replace('torch.', '')}, batch {args.batch} with CFG, "
             f"{size}x{size} latents, NFE {args.nfe}, UniPC, median of {args.repeats} interleaved repeats.\n",
             "| mode | run (ms) | model only (ms) | sampler (ms) | sampler share |", "|---|---:|---:|---:|---:|"]
    for mode in ("eager", "CUDA graph"):
        if f"run ({mode})" in med:
            total, net = med[f"run ({mode})"], med[f"model ({mode})"]
            lines.append(f"| {mode} | {total * 1e3:.2f} | {net * 1e3:.2f} | {(total - net) * 1e3:.2f} | "
                         f"{(total - net) / total:.2%} |")
    print("\n".join(lines))
    out = Path(args.out) if args.out else RESULTS / f"sampler_share_{device.type}{'_tiny' if args.tiny else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
