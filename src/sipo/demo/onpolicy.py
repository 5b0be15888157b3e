"""The demo's on-policy preference pairs: K samples per prompt from the model being fine-tuned, ranked by the reward.

For prompt instance ``i`` (class ``i % 10``, prompt ``"a handwritten digit N"``) the policy draws
``samples_per_prompt`` (K) images, each by deterministic DDIM (eta = 0, ``sampling_steps`` steps)
from its own starting noise ``x_T``; the demo's reward scores them and the best and the worst make
the pair (best-worst). Prompts whose best and worst differ by less than ``min_gap`` are near-ties
and are dropped, as the off-policy sources drop theirs. Called with the pretrained digits model
(the base of every fine-tune) this is the *on-policy* source; called with a fine-tune's policy it
is the next round of iterative DPO (:mod:`sipo.demo.iterative`).

Every sample has a seed, and its starting noise is exactly (the recipe ``objective.noise=stored``
must reproduce)::

    x_T = torch.randn((1, 1, r, r), generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)

one call, the generator's first and only draw, on the CPU, ``r`` the model's resolution (8): the
digits family's latent *is* the grey picture ``[1, 1, r, r]``. It is what ``sipo eval`` does per
picture (one CPU generator per image, ``diffusers``' ``randn_tensor`` with a list of generators draws
``(1, *shape[1:])`` from each) and does not depend on the batch. Sample ``j`` of prompt instance
``i`` has seed ``settings.seed * SEED_STRIDE + i * K + j``.

Written as 8-bit grey PNGs plus ``manifest.jsonl`` (``data.format=jsonl``), one row per pair::

    {"prompt", "chosen", "rejected", "chosen_seed", "rejected_seed", "score_chosen", "score_rejected"}

and ``pairs.json`` (the settings, the noise recipe, counts and mean rewards).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sipo.demo.pairs import PairSet, _write_png, quantize
from sipo.models.digits import digit_prompt

#: seeds of one pair set's samples start at ``settings.seed * SEED_STRIDE`` (sets never share a seed
#: while a set draws fewer than a billion samples)
SEED_STRIDE = 10**9
#: how each side's starting noise is drawn, written into pairs.json beside the seeds
NOISE_RECIPE = ("x_T = torch.randn((1, 1, r, r), generator=torch.Generator('cpu').manual_seed(seed), "
                "dtype=torch.float32): one draw per picture, r = the model's resolution")


@dataclass(frozen=True)
class OnPolicySettings:
    num_pairs: int = 2000
    #: K: samples per prompt; the pair is the best and the worst of them
    samples_per_prompt: int = 4
    min_gap: float = 0.1
    sampling_steps: int = 25
    seed: int = 0


def sample_seed(settings: OnPolicySettings, prompt_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of prompt instance ``prompt_index``."""
    return settings.seed * SEED_STRIDE + prompt_index * settings.samples_per_prompt + sample_index


def initial_noise(seed: int, resolution: int) -> Tensor:
    """``x_T`` ``[1, 1, r, r]`` of the picture with this seed (module docstring: the exact recipe)."""
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, 1, resolution, resolution), generator=generator, dtype=torch.float32)


def make_onpolicy_pairs(
    policy,
    reward,
    out_dir: str | Path,
    settings: OnPolicySettings = OnPolicySettings(),
    progress: bool = True,
    desc: str = "on-policy pairs",
) -> PairSet:
    """Sample K pictures per prompt from ``policy`` (a :class:`DigitsAdapter`, LoRA or not), keep
    best vs worst by ``reward`` until ``settings.num_pairs`` pairs survive the near-tie filter."""
    if settings.samples_per_prompt < 2:
        raise ValueError("on-policy pairs need samples_per_prompt >= 2 (a best and a worst)")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    k, resolution = settings.samples_per_prompt, policy.resolution
    kept: dict[str, list] = {key: [] for key in ("label", "chosen", "rejected", "r_chosen", "r_rejected",
                                                 "s_chosen", "s_rejected")}
    next_prompt = examined = 0
    bar = tqdm(total=settings.num_pairs, desc=desc, disable=not progress, dynamic_ncols=True)
    while len(kept["label"]) < settings.num_pairs:
        count = max(64, int((settings.num_pairs - len(kept["label"])) * 1.5))
        indices = range(next_prompt, next_prompt + count)
        next_prompt += count
        labels = torch.tensor([i % 10 for i in indices]).repeat_interleave(k)  # [count * K], prompt-major
        seeds = torch.tensor([sample_seed(settings, i, j) for i in indices for j in range(k)])
        noise = torch.cat([initial_noise(int(seed), resolution) for seed in seeds])
        images = quantize(policy.sample_labels(labels, noise=noise, num_inference_steps=settings.sampling_steps))
        rewards = reward(images, labels).reshape(count, k)
        best, worst = rewards.argmax(dim=1), rewards.argmin(dim=1)
        for row in range(count):
            if len(kept["label"]) == settings.num_pairs:
                break
            examined += 1
            win, lose = row * k + int(best[row]), row * k + int(worst[row])
            if float(rewards[row, best[row]] - rewards[row, worst[row]]) < settings.min_gap:
                continue
            kept["label"].append(int(labels[win]))
            kept["chosen"].append(images[win])
            kept["rejected"].append(images[lose])
            kept["r_chosen"].append(float(rewards[row, best[row]]))
            kept["r_rejected"].append(float(rewards[row, worst[row]]))
            kept["s_chosen"].append(int(seeds[win]))
            kept["s_rejected"].append(int(seeds[lose]))
            bar.update(1)
        if next_prompt > 50 * settings.num_pairs + 1000:
            raise RuntimeError("almost every prompt's best and worst sample are a near-tie; lower OnPolicySettings.min_gap "
                               "or raise samples_per_prompt")
    bar.close()

    prompts = [digit_prompt(c) for c in kept["label"]]
    lines = []
    for i, prompt in enumerate(prompts):
        chosen, rejected = f"images/{i:05d}_chosen.png", f"images/{i:05d}_rejected.png"
        _write_png(kept["chosen"][i], out_dir / chosen)
        _write_png(kept["rejected"][i], out_dir / rejected)
        lines.append(json.dumps({
            "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_seed": kept["s_chosen"][i], "rejected_seed": kept["s_rejected"][i],
            "score_chosen": round(kept["r_chosen"][i], 6), "score_rejected": round(kept["r_rejected"][i], 6),
        }))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    pair_set = PairSet(
        manifest=manifest, prompts=prompts, labels=torch.tensor(kept["label"]),
        chosen=torch.stack(kept["chosen"]), rejected=torch.stack(kept["rejected"]),
        chosen_reward=torch.tensor(kept["r_chosen"]), rejected_reward=torch.tensor(kept["r_rejected"]),
        chosen_source=["policy"] * len(prompts), rejected_source=["policy"] * len(prompts),
        candidates_drawn=examined,  # prompts examined: each yields one pair or one near-tie
        chosen_real_index=[-1] * len(prompts), rejected_real_index=[-1] * len(prompts),
    )
    summary = {"settings": asdict(settings), "noise": NOISE_RECIPE, "seed_rule": "settings.seed * SEED_STRIDE + "
               "prompt_index * samples_per_prompt + sample_index", "seed_stride": SEED_STRIDE,
               "sampler": f"DDIM eta 0, {settings.sampling_steps} steps", **pair_set.summary()}
    (out_dir / "pairs.json").write_text(json.dumps(summary, indent=2))
    return pair_set

