"""The hook for video benchmarks (VBench) beside the frame-averaged image scorers.

A :class:`VideoBenchmark` takes the saved videos of one model (folders of ``frame_NNN.png``, as
``sipo eval`` writes them) with their prompts and returns ``{dimension: score}``. ``sipo eval
--vbench DIM,DIM`` runs :class:`VBench` on the base and the aligned videos and adds one row per
dimension to the report (means only: VBench scores whole sets, so there is no per-video win rate).

VBench itself is not a dependency: ``pip install vbench`` (it needs torchvision and downloads its
own models on first use, so it runs only where the network and a CUDA torch are available).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol, Sequence

from sipo.errors import SipoError


class VideoBenchmark(Protocol):
    """What ``sipo eval`` needs from a video benchmark."""

    name: str

    def evaluate(self, videos: Sequence[Path], prompts: Sequence[str], output_dir: Path) -> dict[str, float]:
        """Score a model's videos (one prompt each); return ``{dimension: score}`` for the whole set."""


class VBench:
    """VBench (Huang et al. 2024) in its ``custom_input`` mode, one call per model.

    ``dimensions``: VBench dimension names (``subject_consistency``, ``motion_smoothness``,
    ``dynamic_degree``, ``aesthetic_quality``, ``imaging_quality``, ...).
    """

    name = "vbench"

    def __init__(self, dimensions: Sequence[str], device: str = "cuda", full_info_json: str | None = None):
        if not dimensions:
            raise SipoError("--vbench needs at least one dimension, e.g. --vbench subject_consistency,motion_smoothness")
        self.dimensions, self.device, self.full_info_json = list(dimensions), device, full_info_json

    def evaluate(self, videos: Sequence[Path], prompts: Sequence[str], output_dir: Path) -> dict[str, float]:
        try:
            from vbench import VBench as _VBench
        except ImportError:
            raise SipoError("--vbench needs the vbench package; pip install vbench (it downloads its models on first use)") from None
        output_dir.mkdir(parents=True, exist_ok=True)
        bench = _VBench(self.device, self.full_info_json, str(output_dir))
        name = output_dir.name
        bench.evaluate(videos_path=str(Path(videos[0]).parent), name=name, dimension_list=self.dimensions,
                       mode="custom_input", prompt_list={str(v): p for v, p in zip(videos, prompts)})
        results = json.loads((output_dir / f"{name}_eval_results.json").read_text())
        # VBench writes {dimension: [set score, per-video details]}
        return {dim: float(value[0] if isinstance(value, list) else value) for dim, value in results.items()}


def run_video_benchmarks(
    benchmarks: Sequence[VideoBenchmark], videos: dict[str, list[Path]], prompts: list[str], output_dir: Path
) -> dict[str, dict[str, dict[str, float]]]:
    """``{benchmark: {model: {dimension: score}}}`` for each model's videos."""
    results: dict[str, dict[str, dict[str, float]]] = {}
    for benchmark in benchmarks:
        results[benchmark.name] = {
            model: benchmark.evaluate(paths, prompts, output_dir / benchmark.name / model)
            for model, paths in videos.items()
        }
    return results
