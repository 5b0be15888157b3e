"""What the trackers other than TensorBoard need (``train.report_to``): one W&B run per sipo run.

A sipo run is one W&B run: its id is drawn when the run starts, kept in ``<output_dir>/logs/`` and
given back to ``wandb.init`` (``resume="allow"``) by every ``--resume``, so a resumed run appends to
the run it continues, also offline (``WANDB_MODE=offline``: ``wandb sync`` joins the folders of one
id). ``wandb`` is imported only here and only when ``train.report_to=wandb``.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

#: the W&B run id of a run, under its logs folder (``--overwrite`` removes logs/, so a new run gets a new id)
WANDB_RUN_ID_FILE = Path("logs") / "wandb-run-id"
#: the W&B project when ``WANDB_PROJECT`` names none
WANDB_PROJECT = "sipo"


def tracker_project(report_to: str) -> str:
    """The name accelerate's ``init_trackers`` passes on: TensorBoard's folder (``logs``), W&B's project."""
    return os.environ.get("WANDB_PROJECT", WANDB_PROJECT) if report_to == "wandb" else "logs"


def wandb_init_kwargs(output_dir: Path, resumed: bool) -> dict[str, Any]:
    """``wandb.init`` arguments: the run's id (drawn now for a new run, read back on a resume), its name
    (the output folder's), and its files under ``<output_dir>/logs`` unless ``WANDB_DIR`` says elsewhere."""
    id_file = Path(output_dir) / WANDB_RUN_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.is_file() else ""
    if not run_id:
        run_id = secrets.token_hex(4)  # 8 characters of [0-9a-f], as W&B's own ids are
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id + "\n")
    kwargs: dict[str, Any] = {"id": run_id, "resume": "allow", "name": Path(output_dir).resolve().name}
    if not os.environ.get("WANDB_DIR"):
        kwargs["dir"] = str(Path(output_dir) / "logs")
    return kwargs


def log_sample_grid(accelerator, grid, captions: list[str], pictures: list, step: int) -> None:
    """The validation samples to every tracker that takes images: TensorBoard the grid, W&B the grid
    and each sample with its prompt and seed as caption."""
    for tracker in accelerator.trackers:
        if getattr(tracker, "name", "") == "wandb":
            import wandb

            images = [wandb.Image(_hwc(picture), caption=caption) for caption, picture in zip(captions, pictures)]
            tracker.log({"validation_samples": [wandb.Image(grid, caption="prompts down, seeds across")],
                         "validation_samples_each": images}, step=step)
        elif hasattr(tracker, "log_images"):
            tracker.log_images({"validation_samples": grid[None]}, step=step, dataformats="NHWC")


def _hwc(picture):
    """A ``[3, H, W]`` picture in [0, 1] (a video: its middle frame) as uint8 ``H x W x 3``."""
    tile = picture[picture.shape[0] // 2] if picture.ndim == 4 else picture
    return tile.float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
