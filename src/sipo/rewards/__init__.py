"""Reward models behind one interface (:class:`Scorer`), in a closed registry.

``load_scorer("pickscore", "/models/PickScore_v1", device)`` returns a scorer whose
``score(images, prompts)`` gives one float per image. docs/evaluation.md names the checkpoint
each scorer expects and what to install.
"""

from __future__ import annotations

import importlib

import torch

from sipo.errors import SipoError
from sipo.rewards.base import Scorer, clip_preprocess

# name -> "module:class"; imported on use so `sipo --help` stays fast.
SCORERS: dict[str, str] = {
    "pickscore": "sipo.rewards.clip:PickScore",
    "hpsv2": "sipo.rewards.hpsv2:HPSv2",
    "imagereward": "sipo.rewards.image_reward:ImageReward",
    "hpsv3": "sipo.rewards.hpsv3:HPSv3",
    "aesthetic": "sipo.rewards.clip:AestheticScore",
    "clipscore": "sipo.rewards.clip:CLIPScore",
    "digits-classifier": "sipo.demo.reward:DigitScorer",
}


def scorer_class(name: str) -> type[Scorer]:
    """The scorer class registered as ``name``; an unknown name stops with the list of known ones."""
    if name not in SCORERS:
        raise SipoError(f"unknown scorer {name!r}; choose from {sorted(SCORERS)}")
    module_name, class_name = SCORERS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_scorer(name: str, source: str | None = None, device: torch.device | str = "cpu") -> Scorer:
    """Load scorer ``name`` from ``source`` (a local directory; None: its published checkpoint where online)."""
    return scorer_class(name).load(source, device)


__all__ = ["SCORERS", "Scorer", "clip_preprocess", "load_scorer", "scorer_class"]
