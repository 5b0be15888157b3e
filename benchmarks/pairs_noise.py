"""Does `objective.noise=stored` reproduce the starting noise of pictures `sipo pairs` sampled on a GPU
in half precision? (docs/pairs.md; a GPU check of benchmarks/gpu_checks.sh, PART pairs.)

Builds a random-weight SD1.5 (``--scale full``: the published configs at 512 px), runs `sipo pairs`
with ``--dtype fp16`` on the card, then samples each row's two pictures again with
``latents=starting_noise(seed, latent shape, the row's noise_dtype)`` and prints whether the
pipeline's own ``prepare_latents`` draw equals ``starting_noise`` on the card, the largest pixel
difference of the re-sampled pictures from the saved PNGs (sampled in a batch of 4: half-precision
batching alone moves a pixel, 0.73/255 measured on the tiny model on the CPU), and the time::

    python benchmarks/pairs_noise.py --scale full --work-dir /tmp/sipo-pairs-noise
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="tiny", choices=("tiny", "full"))
    parser.add_argument("--work-dir", default="/tmp/sipo-pairs-noise")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from sipo.config import load_config
    from sipo.evaluate import load_picture
    from sipo.models.sd15 import SD15Adapter
    from sipo.pairs import PairsOptions, make_pairs
    from sipo.preference import NOISE_DTYPES, starting_noise
    from tiny_scorers import make_tiny_clip  # tests/ on PYTHONPATH (gpu_checks.sh sets it)

    work = Path(args.work_dir)
    model = SD15Adapter.build_random_pipeline(work / f"sd15-{args.scale}", scale=args.scale)
    scorer = make_tiny_clip(work / "clip", positive=True)
    (work / "prompts.txt").write_text("a photo of a cat\na red dog\n")
    resolution = 512 if args.scale == "full" else 32
    config = load_config(None, [f"model.pretrained_path={model}", f"model.resolution={resolution}"])
    started = time.perf_counter()
    result = make_pairs(config, PairsOptions(prompts=str(work / "prompts.txt"), out=work / "pairs", samples_per_prompt=2,
                                             scorers=["pickscore"], scorer_paths={"pickscore": str(scorer)},
                                             num_inference_steps=args.steps, batch_size=4, dtype="fp16", progress=False))
    seconds = time.perf_counter() - started
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionPipeline.from_pretrained(str(model), torch_dtype=torch.float16, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    shape = (pipe.unet.config.in_channels, resolution // factor, resolution // factor)
    drawn = pipe.prepare_latents(1, shape[0], resolution, resolution, torch.float16, torch.device(device),
                                 [torch.Generator().manual_seed(0)])
    same_draw = torch.equal(drawn.float().cpu(), starting_noise(0, shape, torch.float16))
    worst = 0.0
    for line in (work / "pairs" / "pairs.jsonl").read_text().splitlines():
        row = json.loads(line)
        for side in ("chosen", "rejected"):
            latents = starting_noise(row[f"{side}_seed"], shape, NOISE_DTYPES[row["noise_dtype"]]).half().to(device)
            again = pipe([row["prompt"]], latents=latents, num_inference_steps=args.steps, output_type="pt").images[0]
            saved = load_picture(work / "pairs" / row[side])
            worst = max(worst, float((again.float().cpu().clamp(0, 1) - saved).abs().max()) * 255)
    print(f"{args.scale} SD1.5 fp16 on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'}: {result.samples} samples in {seconds:.1f} s "
          f"(model load included); prepare_latents == starting_noise: {same_draw}; largest difference of a picture "
          f"re-sampled one at a time from its stored noise from the batched one: {worst:.2f} / 255")


if __name__ == "__main__":
    main()
