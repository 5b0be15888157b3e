"""One dataclass tree for every run: YAML file + ``key=value`` overrides, validated once at start.

``load_config("configs/sd15_pickapic.yaml", ["objective.beta=2500", "train.max_steps=10"])``
returns a :class:`SipoConfig`. Unknown keys stop with the list of valid ones; values are checked
against each field's type (an int where a float is expected is accepted and converted, so
``beta: 5000`` is the float 5000.0). Each field carries its help text in ``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipo.errors import SipoError

# name -> switches (docs/spec.md section 5). "+clip" reweights by the clipped weight without masking: clipping
# only acts on weights that are used, so alone it would be DPO again. C&M keeps `clip` on for
# fidelity to its name and logs the clipped weights, but its loss is the masked mean (docs/spec.md section 4).
OBJECTIVE_PRESETS: dict[str, dict[str, bool]] = {
    "dpo": {"mask": False, "clip": False, "reweight": False},
    "dpo+mask": {"mask": True, "clip": False, "reweight": False},
    "dpo+clip": {"mask": False, "clip": True, "reweight": True},
    "dpo+reweight": {"mask": False, "clip": False, "reweight": True},
    "dpo-cm": {"mask": True, "clip": True, "reweight": False},
    "sipo": {"mask": True, "clip": True, "reweight": True},
    "dpo-cm-outside": {"mask": True, "clip": True, "reweight": False},
    "sipo-outside": {"mask": True, "clip": True, "reweight": True},
    # The field's other objectives (docs/spec.md section 9): no mask by default; objective.mask=true
    # combines any of them with the mask of the paper reading (tau 0.9 on min(w_w, w_l)).
    "hinge": {"mask": False, "clip": False, "reweight": False},
    "ipo": {"mask": False, "clip": False, "reweight": False},
    "sft": {"mask": False, "clip": False, "reweight": False},
    "kto": {"mask": False, "clip": False, "reweight": False},
    "mapo": {"mask": False, "clip": False, "reweight": False},
    "dspo": {"mask": False, "clip": False, "reweight": False},
    "dmpo": {"mask": False, "clip": False, "reweight": False},
    "alpha-dpo": {"mask": False, "clip": False, "reweight": False},
    "sipo-elementwise": {"mask": False, "clip": False, "reweight": False},
}

# The per-pair loss each preset computes (sipo.preference.pair_loss_values); every earlier preset is DPO's.
PRESET_LOSS: dict[str, str] = {name: "dpo" for name in OBJECTIVE_PRESETS} | {
    name: name for name in ("hinge", "ipo", "sft", "kto", "mapo", "dspo", "dmpo", "alpha-dpo", "sipo-elementwise")
}
#: objectives that use no reference model: their step skips the reference forward
REFERENCE_FREE_LOSSES = ("sft", "mapo")
#: objectives whose per-pair loss is a function of z alone (they accept label smoothing only if DPO,
#: and the inside weights of weight_placement=inside)
Z_LOSSES = ("dpo", "hinge", "ipo", "dmpo", "alpha-dpo")

# The two readings of SPEC 4a (docs/method.md). "paper": what the paper's reviewers quote from its
# full text -- the weights inside the log-sigmoid per trajectory, mask tau 0.9 on min(w_w, w_l),
# clip [1-eps, 1+eps] with eps 0.1. "project": this project's first reading, one pair weight
# (w_w * w_l) outside on the per-pair loss, tau 0.5, clip [0, 2] (= eps 1), self-normalised.
PAPER_READING: dict[str, Any] = {"weight_placement": "inside", "tau": 0.9, "clip_eps": 0.1, "pair_weight": "min"}
PROJECT_READING: dict[str, Any] = {"weight_placement": "outside", "tau": 0.5, "clip_eps": 1.0, "pair_weight": "product"}
# beta per objective (docs/spec.md section 4a, the paper's Table A1 read as x1000 code units on images): DPO 5000,
# C&M and SIPO 5x smaller; the project reading used one beta for all. The ablations are pieces of
# SIPO and share its beta, so each differs from SIPO by its switches alone.
PRESET_SETTINGS: dict[str, dict[str, Any]] = {
    "dpo": {**PAPER_READING, "beta": 5000.0},
    "dpo+mask": {**PAPER_READING, "beta": 1000.0},
    "dpo+clip": {**PAPER_READING, "beta": 1000.0},
    "dpo+reweight": {**PAPER_READING, "beta": 1000.0},
    "dpo-cm": {**PAPER_READING, "beta": 1000.0},
    "sipo": {**PAPER_READING, "beta": 1000.0},
    "dpo-cm-outside": {**PROJECT_READING, "beta": 5000.0},
    "sipo-outside": {**PROJECT_READING, "beta": 5000.0},
    # docs/spec.md section 9: each author's default in this project's units (z = -0.5*beta*delta; docs/method.md).
    "hinge": {**PAPER_READING, "beta": 5000.0},  # diffusers SD1.5 example: its beta_dpo 2500 = 5000 here
    "ipo": {**PAPER_READING, "beta": 5000.0},  # diffusers' ipo branch shares the example's beta
    "sft": {**PAPER_READING, "beta": 5000.0},  # beta unused (reference-free); kept for z in the logs
    "kto": {**PAPER_READING, "beta": 2000.0},  # diffusion-kto: beta_dpo 1000 scales g without 0.5
    "mapo": {**PAPER_READING, "beta": 5000.0},  # beta unused: MaPO's weight is objective.mapo_weight
    "dspo": {**PAPER_READING, "beta": 0.001},  # DSPO SD1.5 launcher (same scale as here); SDXL 5000
    "dmpo": {**PAPER_READING, "beta": 2000.0, "safeguard": True},  # Diffusion-SDPO sd15_dmpo.sh (mu 0.9)
    "alpha-dpo": {**PAPER_READING, "beta": 4000.0},  # alpha-DPO launch/train.sh (SDXL)
    "sipo-elementwise": {**PAPER_READING, "beta": 0.02},  # sd-scripts PR #1427's beta: its logit has no 0.5 (SPEC 9)
}

# Presets whose authors ship one launcher per variant: the variant's own defaults, applied to the keys
# left unset like the preset's (so a preset's beta follows its variant; docs/method.md).
PRESET_VARIANT_SETTINGS: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    "dspo": ("dspo_variant", {"sdxl": {"beta": 5000.0}}),  # DSPO's SDXL launcher (its SD1.5 one: 0.001)
}


def preset_settings(name: str, variant_of: typing.Callable[[str], Any]) -> dict[str, Any]:
    """The defaults of preset ``name``, with those of its variant (``variant_of(key)`` reads the variant key)."""
    settings = dict(PRESET_SETTINGS[name])
    if name in PRESET_VARIANT_SETTINGS:
        key, variants = PRESET_VARIANT_SETTINGS[name]
        settings.update(variants.get(variant_of(key), {}))
    return settings


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _choice(name: str, value: Any, options: typing.Iterable[Any]) -> None:
    options = tuple(options)
    if value not in options:
        raise SipoError(f"{name}={value!r} is not valid; choose one of {list(options)}")


#: families trained on a DDPM noise schedule (epsilon or v prediction), not rectified flow
NOISE_PREDICTION_FAMILIES = ("sd15", "sdxl", "cogvideox", "digits")


@dataclass
class ModelConfig:
    family: str = _help("model family: sd15, sdxl, flux, flux2, sd3, qwenimage, zimage (images), qwenimage_edit (editing: "
                       "pairs share an input image), cogvideox, wan (videos: Wan2.1 and Wan2.2, TI2V-5B and the two-expert "
                       "T2V-A14B), wan_i2v (Wan2.2 image-to-video), ltx2, hunyuanvideo15, or digits (the demo's); see "
                       "sipo.models.FAMILIES", default="sd15")
    pretrained_path: str = _help(
        "local diffusers pipeline directory (or hub id where online)", default=""
    )
    resolution: int = _help("training resolution in pixels (images are resized and center-cropped)", default=512)
    num_inference_steps: int = _help(
        "inference grid that defines the previous timestep s = t - T/n (docs/spec.md section 3)", default=50
    )
    trust_remote_code: bool = _help(
        "allow custom code from the model directory; off unless you trust its source", default=False
    )
    # performance (issue 8)
    encode_chunk_size: int | None = _help(
        "pictures per VAE call when encoding a batch: bounds the encoder's peak memory "
        "(None: the family's own, sd15 8, sdxl 1 at 1024 px)", default=None
    )
    vae_path: str = _help(
        "sdxl: an AutoencoderKL directory replacing the pipeline's vae/ (empty: the pipeline's own). SDXL's "
        "own VAE overflows in fp16 and is kept fp32 under mixed precision (its config says force_upcast); "
        "an fp16-safe VAE (force_upcast false, e.g. madebyollin/sdxl-vae-fp16-fix) runs in the compute dtype",
        default="",
    )
    # Video families (cogvideox, wan): their T5-XXL / UMT5-XXL text encoders are 19-23 GB in fp32.
    text_encoder_device: str = _help(
        "auto: the text encoder moves to the training device; cpu: it stays in host memory "
        "(video families, flux, sd3; embeddings are computed on the CPU and moved to the device)", default="auto"
    )
    prompt_cache_size: int = _help(
        "remember the text embeddings of this many recently used prompts so each is encoded once "
        "(video families; 0: encode every batch); `sipo cache` stores all of them instead", default=0
    )
    guidance: float = _help(
        "flux: the guidance value FLUX.1-dev's guidance embedding receives while training (3.5, the default "
        "of diffusers' train_dreambooth_lora_flux.py); ignored by models without one (schnell) and other families",
        default=3.5,
    )
    training_sigmas: str = _help(
        "rectified-flow families: the noise levels t indexes while training. scheduler (default): the scheduler's own "
        "training sigmas, what each family's diffusers LoRA script draws from (unshifted (t+1)/T where the scheduler "
        "shifts only at inference: flux, flux2, qwenimage; the fixed shift of sd3, zimage and wan). shifted: the "
        "resolution-shifted sigmas the pipeline samples at (flux, flux2, qwenimage; the same table as scheduler for "
        "sd3, zimage and wan)", default="scheduler"
    )
    frozen_dtype: str = _help(
        "storage of the frozen base weights of a LoRA run: bf16 (the run's compute dtype, bf16 under "
        "train.mixed_precision=bf16) or fp8 (float8_e4m3fn storage, upcast per layer to the compute dtype through "
        "diffusers' enable_layerwise_casting; norms, embeddings and LoRA stay as they are; halves the base's memory "
        "again: Qwen-Image on 48 GB, Wan2.2-A14B at 480p on 80 GB; docs/models.md)", default="bf16"
    )
    offload_frozen: str = _help(
        "none, or group (diffusers' enable_group_offload of the frozen base): it saves no memory yet. On a GPU a LoRA "
        "run stops at start (the offload would move the LoRA weights with their blocks and lose their updates), a "
        "full fine-tune is refused, a two-expert denoiser (Wan2.2-A14B) is refused, and on the CPU nothing moves; "
        "model.frozen_dtype=fp8 is the lever that halves the base's memory (docs/performance.md)", default="none"
    )

    def __post_init__(self) -> None:
        from sipo.models import FAMILIES

        _choice("model.family", self.family, FAMILIES)
        if self.resolution <= 0 or self.num_inference_steps <= 0:
            raise SipoError("model.resolution and model.num_inference_steps must be positive integers")
        if not 8 <= self.resolution <= 4096:  # 4096: 4x SDXL's side; beyond, resizing one picture takes GBs
            raise SipoError(f"model.resolution={self.resolution} is outside the 8 to 4096 pixels sipo trains at; "
                            "set the model's own resolution (e.g. 512 for sd15, 1024 for sdxl)")
        if self.encode_chunk_size is not None and self.encode_chunk_size < 1:
            raise SipoError(f"model.encode_chunk_size must be at least 1, got {self.encode_chunk_size}")
        _choice("model.text_encoder_device", self.text_encoder_device, ("auto", "cpu"))
        if self.prompt_cache_size < 0:
            raise SipoError("model.prompt_cache_size must be 0 (off) or a positive number of prompts")
        _choice("model.training_sigmas", self.training_sigmas, ("scheduler", "shifted"))
        if self.training_sigmas == "shifted" and self.family in NOISE_PREDICTION_FAMILIES:
            raise SipoError(f"model.training_sigmas=shifted applies to rectified-flow families; {self.family} has no "
                            "shifted sigma grid: remove the override")
        _choice("model.frozen_dtype", self.frozen_dtype, ("bf16", "fp8"))
        _choice("model.offload_frozen", self.offload_frozen, ("none", "group"))


@dataclass
class DataConfig:
    format: str = _help("pickapic (parquet shards), jsonl (manifest of prompt/chosen/rejected paths), hf (a datasets hub id, "
                        "hub-layout folder or save_to_disk folder) or webdataset (tar shards)", default="pickapic")
    path: str = _help("parquet file, directory or glob of shards; the JSONL manifest; hf: hub id or dataset folder; "
                      "webdataset: a tar shard, a folder of them, a glob or a brace list (shard-{0000..0009}.tar)", default="")
    max_pairs: int | None = _help("use at most this many valid pairs (None: all)", default=None)
    strict: bool = _help("stop at the first malformed row instead of skipping and counting it", default=False)
    random_flip: bool = _help("horizontally flip both images of a pair at random", default=False)
    num_workers: int = _help("DataLoader worker processes", default=0)
    prefetch_factor: int | None = _help(
        "batches each DataLoader worker prepares ahead (None: PyTorch's 2); needs data.num_workers > 0. Workers "
        "already live for the whole run (one endless loader), so there is no persistent_workers key", default=None
    )
    shuffle: str = _help(
        "block: shuffle parquet row groups, then pairs inside each (reads each row group once per epoch); "
        "full: one uniform permutation (reads a row group per pair); JSONL, hf and webdataset always use full "
        "(data.streaming: the stream's own shuffle)",
        default="block",
    )
    # latent cache (issue 8; docs/performance.md)
    use_cache: str = _help(
        "auto: train from a matching `sipo cache` when one exists; always: require it; never: encode images every step",
        default="auto",
    )
    cache_dir: str | None = _help(
        "latent cache folder (None: <data dir>/.sipo-cache/<key of model, resolution and data>)", default=None
    )
    # Video manifests (docs/data.md, sipo.data.video): how each clip is sampled.
    num_frames: int | None = _help(
        "frames per clip, from its start after fps resampling; shorter clips are skipped "
        "(None: every frame; cogvideox 49, wan 81: 1 + 4k frames)", default=None
    )
    fps: float | None = _help("resample clips to this frame rate first (None: the clip's own rate; cogvideox 8, wan 16)", default=None)
    height: int | None = _help("frame height clips are resized and centre-cropped to (None: model.resolution)", default=None)
    width: int | None = _help("frame width clips are resized and centre-cropped to (None: model.resolution)", default=None)
    split: str = _help(
        "pickapic: read the shards whose names declare this split (train-*.parquet; validation, test); "
        "shards named for no split are always read; hf: the datasets split", default="train"
    )
    # data.format=hf (sipo.data.hf; docs/data.md)
    columns: dict[str, str | None] = _help(
        "hf: dataset column of each of prompt, chosen, rejected, label, input_image (e.g. {prompt: text}); unset keys: Pick-a-Pic "
        "v2's caption/jpg_0/jpg_1/label_0 when jpg_0 and jpg_1 exist, else prompt/chosen/rejected with no label; with a "
        "label, chosen/rejected are the first/second picture and label 1 means the first won; input_image (the picture both "
        "sides edit or animate): the column input_image where there is one", default_factory=dict)
    streaming: bool = _help(
        "hf: read the split as a stream (datasets IterableDataset) instead of indexing it; pairs come in the stream's "
        "order through a shuffle buffer of data.shuffle_buffer rows, and a resume skips the consumed pairs", default=False)
    shuffle_buffer: int = _help("hf with streaming: rows in the shuffle buffer (1: the stream's own order)", default=1000)

    # score margins (sipo relabel; docs/data.md)
    min_score_margin: float | None = _help(
        "skip (and count in the data report) pairs whose |score_margin| (jsonl: or |score_chosen - score_rejected|; "
        "pickapic: or |score_0 - score_1|), as `sipo relabel` writes them, is below this; None: train on every pair",
        default=None)

    # held-out pairs (sipo.validation; docs/validation.md)
    validation_path: str | None = _help(
        "held-out preference pairs in data.format (a file, folder or glob): never trained on, evaluated every "
        "train.validate_every steps", default=None)
    validation_fraction: float | None = _help(
        "hold out this fraction of data.path's pairs instead, chosen by a hash of each pair's place in the files "
        "(the same split for every seed, worker count and resume), in (0, 1)", default=None)

    def __post_init__(self) -> None:
        if self.validation_fraction is not None and not 0.0 < self.validation_fraction < 1.0:
            raise SipoError(f"data.validation_fraction={self.validation_fraction} must be between 0 and 1 (exclusive), "
                            "e.g. 0.05; or leave it unset to hold out nothing")
        if self.validation_fraction is not None and self.validation_path:
            raise SipoError("data.validation_path and data.validation_fraction both name held-out pairs; set one of them")
        for name in ("num_frames", "height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SipoError(f"data.{name} must be a positive integer or null, got {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise SipoError(f"data.fps must be positive or null, got {self.fps}")
        _choice("data.format", self.format, ("pickapic", "jsonl", "hf", "webdataset"))
        self._check_columns()
        _choice("data.shuffle", self.shuffle, ("block", "full"))
        _choice("data.use_cache", self.use_cache, ("auto", "always", "never"))
        if self.min_score_margin is not None and not self.min_score_margin >= 0:
            raise SipoError(f"data.min_score_margin={self.min_score_margin} must be 0 or more (it bounds |margin|), "
                            "or null to keep every pair")
        if self.min_score_margin is not None and self.format not in ("pickapic", "jsonl"):
            raise SipoError(f"data.min_score_margin reads the score columns sipo relabel writes (a JSONL manifest or a "
                            f"Pick-a-Pic shard), not data.format={self.format}; relabel the pairs and train on its "
                            "output, or unset data.min_score_margin")
        if self.max_pairs is not None and self.max_pairs <= 0:
            raise SipoError("data.max_pairs must be a positive integer or null")
        if self.prefetch_factor is not None and (self.prefetch_factor < 1 or self.num_workers == 0):
            raise SipoError(f"data.prefetch_factor={self.prefetch_factor} needs data.num_workers > 0 and a value of at "
                            "least 1; set data.num_workers (e.g. 4) or leave data.prefetch_factor unset")
        if not self.split.strip():
            raise SipoError("data.split is empty; set it to train (the default), validation or test")
        if self.shuffle_buffer < 1:
            raise SipoError(f"data.shuffle_buffer={self.shuffle_buffer} must be at least 1 (1 keeps the stream's order)")
        if self.streaming and self.format != "hf":
            raise SipoError(f"data.streaming=true reads data.format=hf only, not {self.format}; set data.format=hf or "
                            "data.streaming=false")
        if self.streaming and self.validation_fraction is not None:
            raise SipoError("data.validation_fraction picks pairs by index, which a stream has not; set "
                            "data.validation_path to a held-out dataset or data.streaming=false")
        if self.streaming and self.use_cache == "always":
            raise SipoError("data.use_cache=always needs the indexed dataset the latent cache was built from; set "
                            "data.streaming=false or data.use_cache=auto")

    def _check_columns(self) -> None:
        keys = ("prompt", "chosen", "rejected", "label", "input_image")
        if not isinstance(self.columns, dict):
            raise SipoError(f"data.columns={self.columns!r} must be a mapping such as {{prompt: caption, chosen: jpg_0}}")
        for key, name in self.columns.items():
            if key not in keys:
                raise SipoError(f"unknown key data.columns.{key}; valid keys: {list(keys)}")
            if name is not None and (not isinstance(name, str) or not name):
                raise SipoError(f"data.columns.{key}={name!r} must be a column name (or null for label: no label column)")
        if self.columns and self.format != "hf":
            raise SipoError(f"data.columns maps dataset columns for data.format=hf only, not {self.format}; "
                            "remove data.columns or set data.format=hf")


@dataclass
class ObjectiveConfig:
    name: str = _help(f"objective preset: one of {list(OBJECTIVE_PRESETS)} (docs/method.md says which reading each implements)", default="sipo")
    beta: float | None = _help("KL strength, official Diffusion-DPO scaling z = -0.5*beta*delta (docs/spec.md section 2); null: the preset's (dpo 5000, dpo-cm/sipo 1000; the field's presets: their authors' defaults converted to this scaling, x2 where a script has no 0.5: sipo config --list-objectives)", default=None)
    mask: bool | None = _help("override the preset: mask pairs with w < tau or t outside [t_min, t_max]", default=None)
    clip: bool | None = _help("override the preset: clamp weights to [1 - clip_eps, 1 + clip_eps]", default=None)
    reweight: bool | None = _help("override the preset: use the (clipped) weights (inside z, or on each pair's loss outside)", default=None)
    weight_placement: str | None = _help("inside: each trajectory's weight scales its log-ratio inside the log-sigmoid (docs/spec.md section 4a); outside: one weight per pair on the per-pair loss (docs/spec.md section 5); null: the preset's", default=None)
    tau: float | None = _help("mask threshold on the pair weight w (docs/spec.md section 4); null: the preset's (0.9 paper reading, 0.5 project reading)", default=None)
    t_min: int | None = _help("lowest timestep kept by the mask (None: 0)", default=None)
    t_max: int | None = _help("highest timestep kept by the mask (None: T-1)", default=None)
    clip_eps: float | None = _help("weights are clipped to [max(0, 1 - clip_eps), 1 + clip_eps]; null: the preset's (0.1 paper reading, 1.0 = [0, 2] project reading)", default=None)
    normalize: str = _help("outside placement: self divides by sum(mask*w_c), batch by the batch size (inside: always the masked mean)", default="self")
    weight_source: str = _help("sample: each pair's own w; timestep_ema: EMA of w in its timestep bucket (outside placement only)", default="sample")
    ema_buckets: int = _help("timestep buckets over [0, T) for timestep_ema", default=20)
    ema_decay: float = _help("EMA decay for timestep_ema", default=0.99)
    weight_norm: str = _help("per-element mean or sum of the log weight over the D elements (docs/spec.md section 3)", default="mean")
    pair_weight: str | None = _help("combine winner and loser weights for the mask: product, min (thresholds each trajectory) or mean; null: the preset's", default=None)
    weight_model: str = _help("model whose prediction defines p_theta in w: policy or reference", default="policy")
    weight_step: str = _help("s of docs/spec.md section 3: inference = previous step of the model.num_inference_steps grid; adjacent = t - 1", default="inference")
    # training noise levels (docs/spec.md section 10; the SD3 paper's densities, diffusers' flow LoRA scripts)
    timestep_sampling: str = _help("how t is drawn: uniform over [0, T) (every family's default), logit_normal or mode (SD3 paper section 3.1, on the family's own sigma grid); ltx2: the LTX-2 trainer's shifted logit-normal + 10% uniform (model.family=ltx2 only)", default="uniform")
    logit_mean: float = _help("timestep_sampling=logit_normal: mean of the normal whose sigmoid is the noise-level fraction", default=0.0)
    logit_std: float = _help("timestep_sampling=logit_normal: its standard deviation", default=1.0)
    mode_scale: float = _help("timestep_sampling=mode: the SD3 paper's scale s (1.29 as diffusers' scripts; 0 is uniform)", default=1.29)
    noise: str = _help("shared: one fresh noise per pair, the same for both sides (Diffusion-DPO); stored: each side trains from the starting noise x_T its picture was sampled from, reproduced from the row's chosen_seed/rejected_seed (PNAPO; pairs from `sipo pairs`; docs/spec.md section 11). t is drawn per pair either way", default="shared")
    reward_beta: bool = _help("PNAPO's per-pair beta: beta * (2*sigmoid(delta_r) - 1), delta_r the row's score_margin (sipo pairs' standardised margin, or sipo relabel's); losses of z alone (dpo, dpo-cm, sipo, hinge, ipo, ...); off by default (docs/pairs.md)", default=False)
    # The field's objectives and their switches (docs/spec.md section 9; docs/method.md has the table).
    label_smoothing: float = _help("cDPO: -(1-ls)*logsigmoid(z) - ls*logsigmoid(-z), the chance a label is flipped, in [0, 0.5) (DPO-loss presets only)", default=0.0)
    sft_weight: float = _help("adds sft_weight * err_theta(winner) to each pair's loss of any objective, inside its mask, weights and normaliser (unmasked: sft_weight * mean err_theta(winner), SimpleTuner's sft_loss_weight; 0: off)", default=0.0)
    safeguard: bool | None = _help("Diffusion-SDPO's winner safeguard: scale the loser's gradient so a step does not raise the winner's error; null: the preset's (dmpo on, others off)", default=None)
    safeguard_mu: float = _help("safeguard strength mu in [0, 1]: 0.9 SD1.5, 0.6 SDXL (Diffusion-SDPO's scripts); 1 stops the loser's gradient whenever winner and loser residuals agree", default=0.9)
    ipo_tau: float = _help("ipo: (z - 1/(2*tau))^2 pulls every pair to z = 1/(2*tau) (0.5: z = 1)", default=0.5)
    kto_lambda_desirable: float = _help("kto: weight of the winners' (desirable) term", default=1.0)
    kto_lambda_undesirable: float = _help("kto: weight of the losers' (undesirable) term", default=1.0)
    mapo_weight: float = _help("mapo: weight of the margin term (its --beta_mapo; MaPO uses no objective.beta)", default=0.1)
    mapo_snr: float = _help("mapo: the constant s of its log-odds s*e/(exp(s*e) - 1) (its --snr_value)", default=0.5)
    dspo_variant: str = _help("dspo: sd15 (its SD1.5 branch, the paper's formula) or sdxl (its SDXL branch)", default="sd15")
    dmpo_alpha: float = _help("dmpo: pulls sigmoid(z) to 1 - alpha", default=0.01)
    alpha_dpo_alpha: float = _help("alpha-dpo: alpha0 of the adaptive alpha = alpha0 * mean sigmoid(z) (or the fixed alpha)", default=0.9999)
    alpha_dpo_adaptive: bool = _help("alpha-dpo: alpha = alpha_dpo_alpha * mean sigmoid(z) over the step's pairs (its launcher's reweight_step -1); false: fixed", default=True)
    beta_mode: str = _help("fixed: objective.beta throughout; auto: beta = -2*logit(g)/EMA(mean |delta|) so a typical pair's gradient factor sigmoid(-z) is g (docs/spec.md section 9; step 1 uses objective.beta)", default="fixed")
    target_gradient_factor: float = _help("beta_mode=auto: the target g of sigmoid(-z) for a pair of typical margin, in (0, 0.5)", default=0.2)
    beta_min: float = _help("beta_mode=auto: lower clamp of beta", default=1e-3)
    beta_max: float = _help("beta_mode=auto: upper clamp of beta", default=1e6)
    auto_beta_decay: float = _help("beta_mode=auto: EMA decay of mean |delta| per optimizer step", default=0.99)

    def __post_init__(self) -> None:
        _choice("objective.name", self.name, OBJECTIVE_PRESETS)
        # Unset values come from the preset, so a saved config records the values a run used.
        for key, value in {"safeguard": False, **preset_settings(self.name, lambda key: getattr(self, key))}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        self._check_field_objectives()
        _choice("objective.weight_placement", self.weight_placement, ("inside", "outside"))
        _choice("objective.normalize", self.normalize, ("self", "batch"))
        _choice("objective.weight_source", self.weight_source, ("sample", "timestep_ema"))
        _choice("objective.weight_norm", self.weight_norm, ("mean", "sum"))
        _choice("objective.pair_weight", self.pair_weight, ("product", "min", "mean"))
        _choice("objective.weight_model", self.weight_model, ("policy", "reference"))
        _choice("objective.weight_step", self.weight_step, ("inference", "adjacent"))
        _choice("objective.timestep_sampling", self.timestep_sampling, ("uniform", "logit_normal", "mode", "ltx2"))
        _choice("objective.noise", self.noise, ("shared", "stored"))
        if self.logit_std <= 0:
            raise SipoError(f"objective.logit_std must be positive, got {self.logit_std}")
        if not -1.0 <= self.mode_scale <= 2.0 / (math.pi - 2.0):
            raise SipoError(f"objective.mode_scale={self.mode_scale} makes the mode density negative; use a value in [-1, 1.75]")
        if self.beta <= 0:
            raise SipoError(f"objective.beta must be positive, got {self.beta}")
        if self.clip_eps <= 0:
            raise SipoError(f"objective.clip_eps must be positive, got {self.clip_eps}")
        if self.weight_placement == "inside" and self.weight_source == "timestep_ema":
            raise SipoError("objective.weight_source=timestep_ema works with weight_placement=outside only; set one of them")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_buckets < 1:
            raise SipoError("objective.ema_decay must be in [0, 1) and objective.ema_buckets >= 1")

    def _check_field_objectives(self) -> None:
        """The switches of docs/spec.md section 9: each where it is meaningful, one sentence otherwise."""
        loss = PRESET_LOSS[self.name]
        _choice("objective.beta_mode", self.beta_mode, ("fixed", "auto"))
        _choice("objective.dspo_variant", self.dspo_variant, ("sd15", "sdxl"))
        if not 0.0 <= self.label_smoothing < 0.5:
            raise SipoError(f"objective.label_smoothing={self.label_smoothing} must be in [0, 0.5); 0 is plain DPO")
        if self.label_smoothing and loss != "dpo":
            raise SipoError(f"objective.label_smoothing smooths the DPO loss, not {self.name}'s; set objective.label_smoothing=0 or a DPO preset")
        if self.sft_weight < 0:
            raise SipoError(f"objective.sft_weight={self.sft_weight} is negative; set 0 (off) or a positive weight")
        if not 0.0 <= self.safeguard_mu <= 1.0:
            raise SipoError(f"objective.safeguard_mu={self.safeguard_mu} is outside [0, 1]; use 0.9 (SD1.5) or 0.6 (SDXL)")
        if self.safeguard and loss in ("sft", "mapo"):
            raise SipoError(f"objective.safeguard scales the loser's error inside z, which {self.name} does not use; set objective.safeguard=false")
        if self.ipo_tau <= 0:
            raise SipoError(f"objective.ipo_tau={self.ipo_tau} must be positive; the default 0.5 targets z = 1")
        if not 0.0 < self.dmpo_alpha < 1.0 or not 0.0 < self.alpha_dpo_alpha < 1.0:
            raise SipoError("objective.dmpo_alpha and objective.alpha_dpo_alpha must be in (0, 1); use 0.01 and 0.9999")
        if self.mapo_snr <= 0 or self.mapo_weight < 0:
            raise SipoError("objective.mapo_snr must be positive and objective.mapo_weight >= 0; use 0.5 and 0.1")
        if not 0.0 < self.target_gradient_factor < 0.5:
            raise SipoError(f"objective.target_gradient_factor={self.target_gradient_factor} must be in (0, 0.5); use 0.2")
        if not 0.0 < self.beta_min < self.beta_max:
            raise SipoError(f"objective.beta_min={self.beta_min} must be positive and below objective.beta_max={self.beta_max}")
        if not 0.0 <= self.auto_beta_decay < 1.0:
            raise SipoError(f"objective.auto_beta_decay={self.auto_beta_decay} must be in [0, 1); use 0.99")
        if self.beta_mode == "auto" and loss in REFERENCE_FREE_LOSSES:
            raise SipoError(f"{self.name} uses no beta, so objective.beta_mode=auto has nothing to set; set objective.beta_mode=fixed")
        switches = self.switches()
        if loss in REFERENCE_FREE_LOSSES and self.weight_model == "reference":
            raise SipoError(f"{self.name} skips the reference forward, so the weights cannot use it; set objective.weight_model=policy")
        if self.reward_beta and loss not in Z_LOSSES:
            raise SipoError(f"objective.reward_beta scales beta inside z, and {self.name}'s loss is not a function of z alone; "
                            "set objective.reward_beta=false or a DPO-family preset")
        if loss not in Z_LOSSES and switches["reweight"]:
            raise SipoError(f"importance reweighting needs a loss of z alone, which {self.name} is not; set objective.reweight=false "
                            "(objective.mask=true still combines with it)")

    def switches(self) -> dict[str, bool]:
        """The preset's mask/clip/reweight switches with any explicit overrides applied."""
        resolved = dict(OBJECTIVE_PRESETS[self.name])
        for key in resolved:
            value = getattr(self, key)
            if value is not None:
                resolved[key] = value
        return resolved

    def timestep_settings(self) -> dict[str, Any]:
        """Keyword arguments of :func:`sipo.preference.draw_pair_noise` for this objective."""
        return {"timestep_sampling": self.timestep_sampling, "logit_mean": self.logit_mean,
                "logit_std": self.logit_std, "mode_scale": self.mode_scale}

    def loss_settings(self, beta: float | None = None) -> dict[str, Any]:
        """Keyword arguments of :func:`sipo.preference.objective_loss` for this objective.

        ``beta``: the step's beta (``beta_mode=auto``); None: ``objective.beta``.
        """
        return {
            "beta": self.beta if beta is None else beta, "placement": self.weight_placement, **self.switches(), "tau": self.tau,
            "t_min": self.t_min, "t_max": self.t_max, "clip_eps": self.clip_eps, "normalize": self.normalize,
            "objective": self.pair_settings(), "sft_weight": self.sft_weight,
        }

    def pair_settings(self):
        """The :class:`sipo.preference.PairLossSettings` of this objective (what ``compute_pair_terms`` computes)."""
        from sipo.preference import PairLossSettings

        return PairLossSettings(
            loss=PRESET_LOSS[self.name], label_smoothing=self.label_smoothing, safeguard=bool(self.safeguard),
            safeguard_mu=self.safeguard_mu, ipo_tau=self.ipo_tau, kto_lambda_desirable=self.kto_lambda_desirable,
            kto_lambda_undesirable=self.kto_lambda_undesirable, mapo_weight=self.mapo_weight, mapo_snr=self.mapo_snr,
            dspo_variant=self.dspo_variant, dmpo_alpha=self.dmpo_alpha, alpha_dpo_alpha=self.alpha_dpo_alpha,
            alpha_dpo_adaptive=self.alpha_dpo_adaptive, elementwise_eps=self.clip_eps,
        )


@dataclass
class TrainConfig:
    output_dir: str = _help("where checkpoints, logs and the final weights go", default="runs/train")
    seed: int = _help("seed of data order, timesteps and noise", default=0)
    max_steps: int = _help("optimizer steps", default=1000)
    batch_size: int = _help("pairs per process per micro-step", default=1)
    gradient_accumulation_steps: int = _help("micro-steps per optimizer step", default=1)
    learning_rate: float = _help("AdamW learning rate (after warmup)", default=1e-5)
    lr_scheduler: str = _help("constant, linear or cosine (after warmup)", default="constant")
    lr_warmup_steps: int = _help("linear warmup steps", default=0)
    adam_beta1: float = _help("AdamW beta1", default=0.9)
    adam_beta2: float = _help("AdamW beta2", default=0.999)
    adam_weight_decay: float = _help("AdamW weight decay", default=1e-2)
    adam_epsilon: float = _help("AdamW epsilon", default=1e-8)
    max_grad_norm: float = _help("gradient clipping norm (0: off)", default=1.0)
    mixed_precision: str = _help("no, fp16 or bf16 (accelerate)", default="no")
    finetune: str = _help("lora (adapters on the denoiser) or full", default="lora")
    lora_rank: int = _help("LoRA rank", default=8)
    lora_alpha: float = _help("LoRA alpha", default=8.0)
    lora_target_modules: list[str] = _help("LoRA target modules (empty: the family's default)", default_factory=list)
    lora_format: str = _help(
        "diffusers: pytorch_lora_weights.safetensors only; comfyui: also pytorch_lora_weights_comfyui.safetensors "
        "(kohya/ComfyUI keys: lora_unet_* for sd15/sdxl, lora_transformer_* for sd3/flux) beside it, in best/ and in "
        "every checkpoint (docs/models.md)", default="diffusers")
    checkpoint_every: int = _help("write a resumable checkpoint every N optimizer steps (0: only at the end)", default=500)
    keep_last: int = _help("checkpoints to keep", default=3)
    log_every: int = _help("TensorBoard scalars every N optimizer steps", default=10)
    max_bad_steps: int = _help("consecutive non-finite steps before the run stops", default=5)
    gradient_checkpointing: bool = _help("trade compute for memory in the denoiser", default=False)
    report_to: str = _help(
        "where accelerate sends the scalars: tensorboard, wandb or none (logs under <output_dir>/logs)",
        default="tensorboard",
    )
    # performance and exactness (issue 8; docs/performance.md)
    compile: bool = _help("torch.compile the denoiser (first steps are slow while it compiles)", default=False)
    compile_scope: str = _help(
        "what train.compile compiles: blocks (the denoiser's repeated blocks, diffusers' _repeated_blocks, one "
        "graph shared by all; the whole model where it lists none) or model (the whole denoiser)", default="blocks"
    )
    channels_last: bool = _help(
        "UNets: hold convolution weights and activations in channels-last (NHWC) memory order; same values, "
        "a different kernel choice (docs/performance.md has the measured effect)", default=False
    )
    cudnn_benchmark: bool = _help(
        "let cuDNN time its convolution algorithms on the first step and keep the fastest (CUDA only: "
        "nothing on the CPU); not with train.deterministic", default=False
    )
    deterministic: bool = _help(
        "deterministic kernels (torch.use_deterministic_algorithms, cuBLAS workspace, cuDNN, TF32 off): "
        "bit-exact resume on CUDA, somewhat slower", default=False
    )
    # validation (sipo.validation; docs/validation.md)
    validate_every: int = _help(
        "evaluate the held-out pairs (data.validation_path / validation_fraction) every N optimizer steps, and at "
        "step 0 and the end (0: only at step 0 and the end)", default=100)
    validation_seed: int = _help("seed of the held-out pairs' fixed timesteps and noise (never the training stream)", default=1234)
    keep_best: str = _help(
        "none, held_out_accuracy, or the name of one of train.validation_scorers (its mean score): keep the weights "
        "of the best validation under <output_dir>/best (never pruned)", default="none")
    validation_prompts: list[str] = _help(
        "prompts sampled with the current weights at step 0, every train.sample_every steps and at the end (a list, "
        "or one .txt file of one prompt per line); empty: no validation samples", default_factory=list)
    validation_seeds: list[int] = _help("one sample per validation prompt and seed, the same seeds every time",
                                        default_factory=lambda: [0])
    sample_every: int = _help("sample the validation prompts every N optimizer steps (0: step 0 and the end only)",
                              default=0)
    sample_steps: int = _help("sampler steps of the validation samples", default=20)
    sample_guidance_scale: float | None = _help(
        "guidance of the validation samples (None: the family's own, as sipo eval: FLUX model.guidance, SD3.5 7.0, "
        "SDXL 5.0, Qwen-Image true_cfg 4.0, SD1.5 7.5)", default=None)
    validation_scorers: list[str] = _help(
        "reward models (sipo.rewards: pickscore, hpsv2, imagereward, aesthetic, clipscore) scoring each validation "
        "sample: mean, and win rate against step 0 with its bootstrap interval", default_factory=list)
    validation_scorer_paths: list[str] = _help("NAME=DIR: a scorer's local checkpoint (as sipo eval --scorer-path)",
                                               default_factory=list)
    # rounds of on-policy pairs (sipo iterate, docs/pairs.md)
    resume_new_data: bool = _help("--resume may continue on other pairs than the run started with (data files may change): what sipo iterate sets for its rounds", default=False)
    reference_checkpoint: str | None = _help("a checkpoint folder (with trainable.safetensors) whose weights are the reference model instead of the base (sipo iterate --reference previous); holds a second copy of the denoiser in memory", default=None)

    def __post_init__(self) -> None:
        _choice("train.lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice("train.finetune", self.finetune, ("lora", "full"))
        _choice("train.lora_format", self.lora_format, ("diffusers", "comfyui"))
        _choice("train.compile_scope", self.compile_scope, ("blocks", "model"))
        if self.cudnn_benchmark and self.deterministic:
            raise SipoError("train.cudnn_benchmark picks convolution algorithms by timing, which train.deterministic "
                            "forbids; set one of them to false")
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_last", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise SipoError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise SipoError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.validate_every < 0:
            raise SipoError(f"train.validate_every must be 0 or more, got {self.validate_every}")
        if self.keep_best not in ("none", "held_out_accuracy", *self.validation_scorers):
            scorers = (f"train.validation_scorers (now {list(self.validation_scorers)})" if self.validation_scorers
                       else "train.validation_scorers (none set)")
            raise SipoError(
                f"train.keep_best={self.keep_best!r} is neither none, held_out_accuracy nor a scorer of {scorers}; to "
                f"keep the best samples by a scorer, add it to train.validation_scorers and set "
                "train.validation_prompts, or choose none or held_out_accuracy")
        for name in ("sample_every", "sample_steps"):
            if getattr(self, name) < 0 or (name == "sample_steps" and self.sample_steps < 1):
                raise SipoError(f"train.{name} must be {'at least 1' if name == 'sample_steps' else '0 or more'}, "
                                f"got {getattr(self, name)}")
        if self.validation_scorers and not self.validation_prompts:
            raise SipoError("train.validation_scorers score the validation samples; set train.validation_prompts too")
        if self.finetune == "lora" and self.lora_rank < 1:
            raise SipoError("train.lora_rank must be at least 1 for train.finetune=lora")
        if self.finetune == "lora" and self.lora_alpha <= 0:
            # peft scales the adapter's update by lora_alpha / r: 0 trains weights that change nothing
            effect = "zero, so the trained adapters would change nothing" if self.lora_alpha == 0 else "negative"
            raise SipoError(f"train.lora_alpha={self.lora_alpha:g} makes the LoRA scale alpha/rank {effect}; "
                            f"set a positive alpha, e.g. train.lora_alpha={self.lora_rank} (the rank)")


@dataclass
class SipoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: path-valued keys: a leading ``~`` is expanded once, here, so every reader sees the same path
#: (tests/test_reliability_config.py checks that every ``*path`` / ``*_dir`` field is listed)
PATH_KEYS: tuple[str, ...] = ("model.pretrained_path", "model.vae_path", "data.path", "data.cache_dir",
                              "data.validation_path", "train.output_dir")


def expand_user_paths(config: "SipoConfig") -> "SipoConfig":
    """Expand a leading ``~`` in every key of :data:`PATH_KEYS` (a hub id such as ``org/name`` is unchanged)."""
    import os

    for key in PATH_KEYS:
        section, name = key.split(".")
        values = getattr(config, section)
        value = getattr(values, name)
        if isinstance(value, str) and value.startswith("~"):
            setattr(values, name, os.path.expanduser(value))
    return config


#: string fields whose documented values YAML 1.1 reads as booleans (`mixed_precision: no` is False)
_YAML_BOOLEAN_SPELLINGS: dict[str, dict[bool, str]] = {"train.mixed_precision": {False: "no"}}


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints become floats where a float is expected."""
    if isinstance(value, bool) and key in _YAML_BOOLEAN_SPELLINGS and value in _YAML_BOOLEAN_SPELLINGS[key]:
        return _YAML_BOOLEAN_SPELLINGS[key][value]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except SipoError:
                continue
        raise SipoError(f"{key}={value!r} has the wrong type; expected {annotation}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise SipoError(f"{key}={value!r} must be a list")
        return [_coerce(v, item_type, key) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):
        # YAML 1.1 reads `1e-5` (no dot) as a string; users write learning rates that way.
        try:
            return float(value)
        except ValueError:
            pass
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if annotation in (bool, int, float, str) and (
        type(value) is not annotation
    ):
        raise SipoError(
            f"{key}={value!r} has the wrong type; expected {annotation.__name__}"
        )
    return value


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in values if key not in fields), key=str)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        shown = unknown[0] if isinstance(unknown[0], str) and unknown[0].isidentifier() else repr(unknown[0])
        raise SipoError(
            f"unknown config key {prefix}{shown}; valid keys in {where}: {sorted(fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise SipoError(f"{prefix}{name} must be a mapping of keys")
            kwargs[name] = _build(annotation, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, f"{prefix}{name}")
    return cls(**kwargs)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a nested dict; values are parsed as YAML scalars."""
    for override in overrides:
        if "=" not in override:
            raise SipoError(f"override {override!r} is not key=value; write e.g. objective.beta=2500")
        dotted, raw = override.split("=", 1)
        parts = dotted.strip().split(".")
        node = values
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SipoError(f"override {dotted} goes through a non-mapping key {part}")
        try:
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[parts[-1]] = raw  # not a YAML scalar (e.g. a path with odd characters): the plain string
    return values


def find_duplicate_key(text: str) -> tuple[str, int, int] | None:
    """The first key a YAML mapping names twice, as ``(dotted key, its line, the first one's line)``.

    PyYAML keeps the last of two equal keys without a word, so ``beta: 5000`` further down a file
    silently replaces an earlier ``beta``. Walks the composed node tree (``<<`` merge keys may be
    overridden, as YAML intends). ``None`` when no key repeats (or the text is no valid YAML: the
    loader reports that).
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None

    def walk(node, prefix: str, seen_nodes: set[int]):
        if id(node) in seen_nodes:  # an alias points back at a node already walked
            return None
        seen_nodes.add(id(node))
        children = []
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[str, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
                line = key_node.start_mark.line + 1
                if key is not None and key in first_lines:
                    return f"{prefix}{key}", line, first_lines[key]
                if key is not None:
                    first_lines[key] = line
                children.append((value_node, f"{prefix}{key}." if key is not None else prefix))
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, prefix) for item in node.value]
        for child, child_prefix in children:
            found = walk(child, child_prefix, seen_nodes)
            if found:
                return found
        return None

    return walk(root, "", set()) if root is not None else None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SipoConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides
    (a list of ``key=value``; one string is one override, never its characters)."""
    if isinstance(overrides, str):
        overrides = [overrides]
    elif overrides is not None and not all(isinstance(item, str) for item in overrides):
        raise SipoError(f"overrides must be key=value strings, got {overrides!r}; pass e.g. [\"train.max_steps=3\"]")
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        path = resolve_config_path(path)
        try:
            text = path.read_text(encoding="utf-8")
            values = yaml.safe_load(text) or {}
        except UnicodeDecodeError as error:
            raise SipoError(f"config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
        except yaml.YAMLError as error:
            raise SipoError(f"config file {path} is not valid YAML ({error.__class__.__name__}); fix its syntax") from None
        except OSError as error:
            raise SipoError(f"config file {path} cannot be read ({error.strerror}); pass a readable YAML file") from None
        if not isinstance(values, dict):
            raise SipoError(f"config file {path} must be a mapping of sections (model, data, objective, train)")
        duplicate = find_duplicate_key(text)
        if duplicate is not None:
            key, line, first = duplicate
            key = key if key.isprintable() and not any(c.isspace() for c in key) else repr(key)
            raise SipoError(f"config file {path} sets {key} twice (line {first} and line {line}), and YAML would "
                            "silently keep the last; delete one of them")
    values = apply_overrides(values, overrides or [])
    config = expand_user_paths(_build(SipoConfig, values, ""))
    check_values(config)
    return config


def config_from_dict(values: dict[str, Any]) -> SipoConfig:
    """Build and validate a config from a nested dict (as saved beside a run)."""
    if not isinstance(values, dict):
        raise SipoError("a saved config must be a mapping of sections (model, data, objective, train); restore config.yaml")
    config = expand_user_paths(_build(SipoConfig, values, ""))
    check_values(config)
    return config


def save_config(config: SipoConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run leaves beside its weights)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


# ----------------------------------------------------------------------------- packaged configs
def packaged_config_names() -> list[str]:
    """Names of the YAML configs shipped inside the package (``sipo/configs``)."""
    from importlib import resources

    root = resources.files("sipo") / "configs"
    return sorted(entry.name[: -len(".yaml")] for entry in root.iterdir() if entry.name.endswith(".yaml"))


def packaged_config_path(name: str) -> Path | None:
    """The packaged config ``name`` (``demo`` or ``demo.yaml``), or None if sipo ships none by that name."""
    from importlib import resources

    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    packaged = resources.files("sipo") / "configs" / f"{stem}.yaml"
    return Path(str(packaged)) if packaged.is_file() else None


def resolve_config_path(name: str | Path) -> Path:
    """A config file path, or a packaged config named bare (``demo``, ``sd15_pickapic_lora.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    # A bare name is a packaged config even where the working directory has a folder of that
    # name (`sipo demo --output-dir demo` makes one).
    if len(path.parts) == 1 or (len(path.parts) == 2 and path.parts[0] == "configs"):
        packaged = packaged_config_path(path.name)
        if packaged is not None:
            return packaged
    if path.exists():
        raise SipoError(f"config {path} is not a file; pass --config with a YAML file")
    raise SipoError(
        f"config file {path} does not exist; pass --config with a YAML file or a packaged name "
        f"({', '.join(packaged_config_names())})"
    )


# ----------------------------------------------------------------------------- cross-field checks
def check_values(config: SipoConfig) -> None:
    """Checks that need more than one field, or every field: finiteness, ranges, orderings.

    Kept apart from the dataclasses' own ``__post_init__`` so new fields get the finiteness check
    without code; ``check_against_model`` adds the checks that need the model's own numbers.
    """
    import math

    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        for item in dataclasses.fields(values):
            value = getattr(values, item.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SipoError(f"{section.name}.{item.name}={value} is not a finite number; set a finite value")
    oc, tc = config.objective, config.train
    if oc.tau < 0:
        raise SipoError(f"objective.tau={oc.tau} is negative, and weights are never negative; set a threshold >= 0")
    for name in ("t_min", "t_max"):
        value = getattr(oc, name)
        if value is not None and value < 0:
            raise SipoError(f"objective.{name}={value} is negative; timesteps start at 0")
    if oc.t_min is not None and oc.t_max is not None and oc.t_min > oc.t_max:
        raise SipoError(f"objective.t_min={oc.t_min} is above objective.t_max={oc.t_max}, which would mask every pair; "
                        "swap them")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(tc, name) < 1.0:
            raise SipoError(f"train.{name}={getattr(tc, name)} is outside [0, 1); use e.g. 0.9 / 0.999")
    for name in ("adam_weight_decay", "adam_epsilon", "max_grad_norm", "lr_warmup_steps", "checkpoint_every"):
        if getattr(tc, name) < 0:
            raise SipoError(f"train.{name}={getattr(tc, name)} is negative; set it >= 0")
    if tc.report_to not in ("tensorboard", "wandb", "none"):
        raise SipoError(f"train.report_to={tc.report_to!r} is not valid; choose one of ['tensorboard', 'wandb', 'none']")
    if config.data.num_workers < 0:
        raise SipoError(f"data.num_workers={config.data.num_workers} is negative; set 0 or more")
    if oc.noise == "stored" and config.data.random_flip:
        raise SipoError("objective.noise=stored trains each picture from the noise it was sampled from, which a mirrored "
                        "picture was not; set data.random_flip=false")
    if config.model.frozen_dtype == "fp8" and tc.mixed_precision == "no":
        # measured: tiny SD1.5, torch 2.13 CPU - the first backward stops with "expected scalar type Float
        # but found Float8_e4m3fn" (the layer's weight is cast back to fp8 before autograd reads it)
        raise SipoError("model.frozen_dtype=fp8 computes each layer in the mixed-precision dtype, and "
                        "train.mixed_precision=no has none; set train.mixed_precision=bf16 (or fp16 on a GPU)")
    if config.model.offload_frozen != "none" and tc.finetune == "full":
        raise SipoError("model.offload_frozen offloads the frozen base of a LoRA run, and train.finetune=full trains "
                        "every weight; set model.offload_frozen=none or train.finetune=lora")
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if isinstance(value, str) and value and not value.strip():
            raise SipoError(f"{key}={value!r} is only blanks; set a path, or leave it empty where it may be unset")
    if not tc.output_dir:  # Path("") is the working directory: a run would write among the user's files
        raise SipoError("train.output_dir is empty, which would write the run into the working directory; "
                        "set it to a directory of its own, e.g. train.output_dir=runs/my-run")
    if config.objective.timestep_sampling == "ltx2" and config.model.family != "ltx2":
        raise SipoError("objective.timestep_sampling=ltx2 is the LTX-2 trainer's density over LTX-2's token count and "
                        "unshifted sigmas; set model.family=ltx2, or objective.timestep_sampling=uniform")
    if tc.keep_best == "held_out_accuracy" and not (config.data.validation_path or config.data.validation_fraction):
        raise SipoError("train.keep_best=held_out_accuracy needs held-out pairs; set data.validation_fraction "
                        "(e.g. 0.05) or data.validation_path")


def check_against_model(config: SipoConfig, num_train_timesteps: int | None, latent_factor: int | None,
                        native_resolution: int | None) -> list[str]:
    """Checks against the model's own numbers; raises on what cannot work, returns warnings for the odd.

    Any number the model directory does not state is passed as ``None`` and its check skipped.
    """
    oc, resolution = config.objective, config.model.resolution
    if num_train_timesteps is not None:
        for name in ("t_min", "t_max"):
            value = getattr(oc, name)
            if value is not None and value >= num_train_timesteps:
                raise SipoError(f"objective.{name}={value} is outside the model's timesteps [0, {num_train_timesteps}); "
                                f"set it to at most {num_train_timesteps - 1}")
        if config.model.num_inference_steps > num_train_timesteps:  # the grid of docs/spec.md section 3
            raise SipoError(f"model.num_inference_steps={config.model.num_inference_steps} is more than the model's "
                            f"{num_train_timesteps} training timesteps, so its inference grid has no previous step; "
                            f"set it to at most {num_train_timesteps} (50 is the default)")
    if latent_factor and resolution % latent_factor:
        lower = max(latent_factor, resolution // latent_factor * latent_factor)
        raise SipoError(f"model.resolution={resolution} is not divisible by the VAE's factor {latent_factor}; "
                        f"use e.g. {lower} or {lower + latent_factor}")
    warnings = []
    if native_resolution and not native_resolution / 2 <= resolution <= native_resolution * 2:
        warnings.append(f"model.resolution={resolution} is far from the model's own {native_resolution} pixels; "
                        "it will train, but expect poor samples (warning only)")
    return warnings


def describe_config(config: SipoConfig) -> str:
    """The resolved config as YAML, each key commented with its help and, where it differs, its default.

    The text loads back with ``yaml.safe_load`` to exactly ``config.to_dict()``.
    """
    lines = []
    defaults = SipoConfig()
    for section in dataclasses.fields(config):
        values, default_values = getattr(config, section.name), getattr(defaults, section.name)
        lines.append(f"{section.name}:")
        for item in dataclasses.fields(values):
            value, default = getattr(values, item.name), getattr(default_values, item.name)
            note = item.metadata.get("help", "")
            if value != default:
                note += f" [default: {_yaml_scalar(default)}]"
            else:
                note += " [default]"
            lines.append(f"  {item.name}: {_yaml_scalar(value)}  # {note}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    """A value as YAML 1.1 reads it back: JSON, except floats like 1e-08 need a dot (1.0e-08) to stay floats."""
    import json

    if isinstance(value, float) and "e" in repr(value) and "." not in repr(value).split("e")[0]:
        mantissa, exponent = repr(value).split("e")
        return f"{mantissa}.0e{exponent}"
    return json.dumps(value)


# ----------------------------------------------------------------------------- the objectives table
#: preset -> (per-pair loss, the keys beyond beta its authors set, source). `sipo config --list-objectives`
#: and docs/method.md print the same table (tests/test_objectives_field.py checks that they agree).
OBJECTIVE_TABLE: dict[str, tuple[str, tuple[str, ...], str]] = {
    "dpo": ("-logsigmoid(z), z = -0.5*beta*delta", ("label_smoothing",), "official Diffusion-DPO (SPEC 2)"),
    "dpo-cm": ("masked mean of -logsigmoid(z), min(w_w, w_l) >= tau", ("tau", "clip_eps"), "SIPO paper, reviewers' reading (SPEC 4a)"),
    "sipo": ("masked mean of -logsigmoid(z), clipped c_w, c_l inside z", ("tau", "clip_eps"), "SIPO paper, reviewers' reading (SPEC 4a)"),
    "dpo+mask": ("DPO + the mask", ("tau",), "ablation (SPEC 5)"),
    "dpo+clip": ("DPO + the clipped weights, no mask", ("clip_eps",), "ablation (SPEC 5)"),
    "dpo+reweight": ("DPO + the raw weights, no mask", (), "ablation (SPEC 5)"),
    "dpo-cm-outside": ("masked mean of -logsigmoid(z), w_w*w_l >= tau", ("tau",), "project reading (SPEC 4)"),
    "sipo-outside": ("sum(mask*w_c*loss)/sum(mask*w_c), one pair weight", ("tau", "clip_eps"), "project reading (SPEC 5)"),
    "hinge": ("relu(1 - z)", (), "diffusers SD1.5 DPO example --loss_type hinge (its beta 2500)"),
    "ipo": ("(z - 1/(2*ipo_tau))^2", ("ipo_tau",), "IPO; diffusers' ipo branch (crashes there)"),
    "sft": ("err_theta(w); no reference forward", (), "official Diffusion-DPO --sft"),
    "kto": ("(l_d*(1 - s(b/2*(g_w - kl))) + l_u*(1 - s(-b/2*(g_l - kl))))/2, g = ref_err - err, kl = max(0, mean g)",
            ("kto_lambda_desirable", "kto_lambda_undesirable"), "jacklishufan/diffusion-kto (its beta_dpo 1000)"),
    "mapo": ("err_w - mapo_weight*logsigmoid(T*(f(err_w) - f(err_l))), f(e) = s*e/(exp(s*e) - 1); no reference, no beta",
             ("mapo_weight", "mapo_snr"), "mapo-t2i/mapo utils.compute_loss"),
    "dspo": ("mean((pred_w - target_w) - beta*(1 - sigmoid(z))*(pred_w - pred_ref_w))^2", ("dspo_variant",),
             "huaishengzhu/DSPO train.py (SD1.5; SDXL: dspo_variant=sdxl, beta 5000)"),
    "dmpo": ("KL(Bern(sigmoid z), Bern(1 - dmpo_alpha)) + the winner safeguard", ("dmpo_alpha", "safeguard", "safeguard_mu"),
             "AIDC-AI/Diffusion-SDPO sd15_dmpo.sh (SDXL: beta 6000, mu 0.6)"),
    "alpha-dpo": ("(p^a - (1 - a) - a*p)/(a*(a - 1)), p = sigmoid(z), a = alpha0*mean(p)", ("alpha_dpo_alpha", "alpha_dpo_adaptive"),
                  "yangli-lab/Diffusion_alpha-DPO_ICLR2026 (SDXL launcher)"),
    "sipo-elementwise": ("mean_CHW -logsigmoid(-beta*c_max*delta_elem), c = clamp(1/(exp(ref_e - e) + 1e-8), 1 +- eps)",
                         ("clip_eps",), "kohya-ss/sd-scripts PR #1427 sdpo_loss (its beta, no 0.5)"),
}


def objectives_table() -> str:
    """Every preset with its per-pair loss, its defaults (this project's beta units) and its source, as Markdown."""
    lines = ["| preset | per-pair loss | defaults | source |", "|---|---|---|---|"]
    for name in OBJECTIVE_PRESETS:
        formula, keys, source = OBJECTIVE_TABLE[name]
        resolved = ObjectiveConfig(name=name)
        uses_beta = PRESET_LOSS[name] not in REFERENCE_FREE_LOSSES
        defaults = ([f"beta {resolved.beta:g}"] if uses_beta else []) + [f"{key} {_yaml_scalar(getattr(resolved, key))}" for key in keys]
        lines.append(f"| `{name}` | `{formula}` | {', '.join(defaults) or '-'} | {source} |")
    return "\n".join(lines) + "\n"
