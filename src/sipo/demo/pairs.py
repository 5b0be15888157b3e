"""The demo's off-policy preference pairs: images the base model did not generate, ranked by the reward.

For prompt ``"a handwritten digit N"`` each side of a pair is, independently, a *real* digit N from
``load_digits`` (probability ``real_fraction``) or a sample of class N from the *early*
checkpoint (an under-trained policy, DDIM from fresh noise). The side the reward prefers is
``chosen``; pairs whose rewards differ by less than ``min_gap`` are near-ties and are dropped.
Neither side comes from the base model: this is the off-policy situation SIPO targets.

Written as 8-bit grey PNGs plus ``manifest.jsonl`` (``{"prompt", "chosen", "rejected"}``, paths
relative to the manifest), the format ``data.format=jsonl`` reads.

A held-out set (claim 3's test accuracy) is drawn the same way from another seed, with
``exclude_real`` naming the real digits the training pairs used, so no picture of it is one the
fine-tune trained on: its real sides come from the other digits, its early sides from fresh noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from sipo.demo.reward import DigitReward
from sipo.models.digits import DigitsAdapter, digit_prompt


@dataclass(frozen=True)
class PairSettings:
    num_pairs: int = 2000
    real_fraction: float = 0.5
    min_gap: float = 0.1
    sampling_steps: int = 25
    seed: int = 0


@dataclass
class PairSet:
    manifest: Path
    prompts: list[str]
    labels: torch.Tensor
    chosen: torch.Tensor  # [N, 1, H, W] in [-1, 1], as written (8-bit)
    rejected: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor
    chosen_source: list[str]  # "real" or "early"
    rejected_source: list[str]
    candidates_drawn: int
    #: index into the real digits of each side (-1: an early sample), to keep a held-out set apart
    chosen_real_index: list[int]
    rejected_real_index: list[int]

    def real_indices(self) -> set[int]:
        """The real digits this set's pairs show (either side)."""
        return {i for i in (*self.chosen_real_index, *self.rejected_real_index) if i >= 0}

    def summary(self) -> dict:
        kinds: dict[str, int] = {}
        for chosen, rejected in zip(self.chosen_source, self.rejected_source):
            key = f"{chosen}>{rejected}"
            kinds[key] = kinds.get(key, 0) + 1
        return {
            "pairs": len(self.prompts),
            "candidate_pairs_drawn": self.candidates_drawn,
            "dropped_near_ties": self.candidates_drawn - len(self.prompts),
            "kinds (chosen>rejected)": dict(sorted(kinds.items())),
            "mean_reward_chosen": float(self.chosen_reward.mean()),
            "mean_reward_rejected": float(self.rejected_reward.mean()),
        }


def quantize(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> the 8-bit levels a PNG stores, back in ``[-1, 1]`` (what training will read)."""
    levels = torch.round((images.clamp(-1, 1) + 1.0) / 2.0 * 255.0)
    return levels / 255.0 * 2.0 - 1.0


def _write_png(image: torch.Tensor, path: Path) -> None:
    levels = torch.round((image.clamp(-1, 1) + 1.0) / 2.0 * 255.0).to(torch.uint8)
    Image.fromarray(levels[0].numpy(), mode="L").save(path)


def make_pairs(
    early: DigitsAdapter,
    reward: DigitReward,
    real_images: torch.Tensor,
    real_labels: torch.Tensor,
    out_dir: str | Path,
    settings: PairSettings = PairSettings(),
    progress: bool = True,
    exclude_real: set[int] | frozenset[int] = frozenset(),
) -> PairSet:
    """Draw candidate pairs in rounds until ``settings.num_pairs`` survive the near-tie filter;
    real sides never show a digit whose index is in ``exclude_real``."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(settings.seed)
    allowed = torch.tensor([i not in exclude_real for i in range(len(real_labels))], dtype=torch.bool)
    by_class = [torch.nonzero((real_labels == c) & allowed).flatten() for c in range(10)]
    if settings.real_fraction > 0 and any(len(indices) == 0 for indices in by_class):
        raise ValueError("every real digit of some class is excluded; draw fewer training pairs or none real")
    kept: dict[str, list] = {k: [] for k in ("label", "chosen", "rejected", "r_chosen", "r_rejected", "s_chosen",
                                             "s_rejected", "i_chosen", "i_rejected")}
    drawn = examined = 0
    bar = tqdm(total=settings.num_pairs, desc="off-policy pairs", disable=not progress, dynamic_ncols=True)
    while len(kept["label"]) < settings.num_pairs:
        batch = max(64, int((settings.num_pairs - len(kept["label"])) * 1.5))
        labels = torch.arange(drawn, drawn + batch) % 10
        drawn += batch
        sides = []
        for _ in range(2):
            is_real = torch.rand(batch, generator=generator) < settings.real_fraction
            picks = torch.stack([
                by_class[c][torch.randint(0, len(by_class[c]), (1,), generator=generator)][0] for c in labels.tolist()
            ])
            noise = torch.randn((batch, 1, early.resolution, early.resolution), generator=generator)
            images = real_images[picks].clone()
            if (~is_real).any():
                fake = ~is_real
                images[fake] = early.sample_labels(labels[fake], noise=noise[fake], num_inference_steps=settings.sampling_steps)
            images = quantize(images)
            sides.append((images, reward(images, labels), is_real, torch.where(is_real, picks, -1)))
        (img_a, r_a, real_a, at_a), (img_b, r_b, real_b, at_b) = sides
        a_wins = r_a >= r_b
        near_tie = (r_a - r_b).abs() < settings.min_gap
        for i in range(batch):
            if len(kept["label"]) == settings.num_pairs:
                break
            examined += 1
            if near_tie[i]:
                continue
            a, b = (img_a, r_a, real_a, at_a), (img_b, r_b, real_b, at_b)
            win, lose = (a, b) if a_wins[i] else (b, a)
            kept["label"].append(int(labels[i]))
            kept["chosen"].append(win[0][i])
            kept["rejected"].append(lose[0][i])
            kept["r_chosen"].append(float(win[1][i]))
            kept["r_rejected"].append(float(lose[1][i]))
            kept["s_chosen"].append("real" if win[2][i] else "early")
            kept["s_rejected"].append("real" if lose[2][i] else "early")
            kept["i_chosen"].append(int(win[3][i]))
            kept["i_rejected"].append(int(lose[3][i]))
            bar.update(1)
        if examined > 50 * settings.num_pairs + 1000:
            raise RuntimeError("almost every candidate pair is a near-tie; lower PairSettings.min_gap")
    bar.close()

    prompts = [digit_prompt(c) for c in kept["label"]]
    lines = []
    for i, prompt in enumerate(prompts):
        chosen, rejected = f"images/{i:05d}_chosen.png", f"images/{i:05d}_rejected.png"
        _write_png(kept["chosen"][i], out_dir / chosen)
        _write_png(kept["rejected"][i], out_dir / rejected)
        lines.append(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    pair_set = PairSet(
        manifest=manifest,
        prompts=prompts,
        labels=torch.tensor(kept["label"]),
        chosen=torch.stack(kept["chosen"]),
        rejected=torch.stack(kept["rejected"]),
        chosen_reward=torch.tensor(kept["r_chosen"]),
        rejected_reward=torch.tensor(kept["r_rejected"]),
        chosen_source=kept["s_chosen"],
        rejected_source=kept["s_rejected"],
        candidates_drawn=examined,
        chosen_real_index=kept["i_chosen"],
        rejected_real_index=kept["i_rejected"],
    )
    (out_dir / "pairs.json").write_text(json.dumps({"settings": settings.__dict__, **pair_set.summary()}, indent=2))
    return pair_set
