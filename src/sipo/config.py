"""One dataclass tree for every run: YAML file + ``key=value`` overrides, validated once at start.

``load_config("configs/sd15_pickapic.yaml", ["objective.beta=2500", "train.max_steps=10"])``
returns a :class:`SipoConfig`. Unknown keys stop with the list of valid ones; values are checked
against each field's type (an int where a float is expected is accepted and converted, so
``beta: 5000`` is the float 5000.0). Each field carries its help text in ``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sipo.errors import SipoError

# name -> switches (SPEC 5). "+clip" reweights by the clipped weight without masking: clipping
# only acts on weights that are used, so alone it would be DPO again. C&M keeps `clip` on for
# fidelity to its name and logs the clipped weights, but its loss is the masked mean (SPEC 4).
OBJECTIVE_PRESETS: dict[str, dict[str, bool]] = {
    "dpo": {"mask": False, "clip": False, "reweight": False},
    "dpo+mask": {"mask": True, "clip": False, "reweight": False},
    "dpo+clip": {"mask": False, "clip": True, "reweight": True},
    "dpo+reweight": {"mask": False, "clip": False, "reweight": True},
    "dpo-cm": {"mask": True, "clip": True, "reweight": False},
    "sipo": {"mask": True, "clip": True, "reweight": True},
}


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


def _choice(name: str, value: Any, options: typing.Iterable[Any]) -> None:
    options = tuple(options)
    if value not in options:
        raise SipoError(f"{name}={value!r} is not valid; choose one of {list(options)}")


@dataclass
class ModelConfig:
    family: str = _help("model family: sd15 or digits (see sipo.models.FAMILIES)", default="sd15")
    pretrained_path: str = _help(
        "local diffusers pipeline directory (or hub id where online)", default=""
    )
    resolution: int = _help("training resolution in pixels (images are resized and center-cropped)", default=512)
    num_inference_steps: int = _help(
        "inference grid that defines the previous timestep s = t - T/n of SPEC 3", default=50
    )
    trust_remote_code: bool = _help(
        "allow custom code from the model directory; off unless you trust its source", default=False
    )
    # Video families (cogvideox, wan): their T5-XXL / UMT5-XXL text encoders are 19-23 GB in fp32.
    text_encoder_device: str = _help(
        "auto: the text encoder moves to the training device; cpu: it stays in host memory "
        "(video families; embeddings are computed on the CPU and moved to the device)", default="auto"
    )
    prompt_cache_size: int = _help(
        "remember the text embeddings of this many recently used prompts so each is encoded once "
        "(video families; 0: encode every batch); `sipo cache` stores all of them instead", default=0
    )

    def __post_init__(self) -> None:
        from sipo.models import FAMILIES

        _choice("model.family", self.family, FAMILIES)
        if self.resolution <= 0 or self.num_inference_steps <= 0:
            raise SipoError("model.resolution and model.num_inference_steps must be positive integers")
        _choice("model.text_encoder_device", self.text_encoder_device, ("auto", "cpu"))
        if self.prompt_cache_size < 0:
            raise SipoError("model.prompt_cache_size must be 0 (off) or a positive number of prompts")


@dataclass
class DataConfig:
    format: str = _help("pickapic (parquet shards) or jsonl (manifest of prompt/chosen/rejected paths)", default="pickapic")
    path: str = _help("parquet file, directory or glob of shards; or the JSONL manifest", default="")
    max_pairs: int | None = _help("use at most this many valid pairs (None: all)", default=None)
    strict: bool = _help("stop at the first malformed row instead of skipping and counting it", default=False)
    random_flip: bool = _help("horizontally flip both images of a pair at random", default=False)
    num_workers: int = _help("DataLoader worker processes", default=0)
    shuffle: str = _help(
        "block: shuffle parquet row groups, then pairs inside each (reads each row group once per epoch); "
        "full: one uniform permutation (reads a row group per pair); JSONL manifests always use full",
        default="block",
    )
    # Video manifests (docs/data.md, sipo.data.video): how each clip is sampled.
    num_frames: int | None = _help(
        "frames per clip, from its start after fps resampling; shorter clips are skipped "
        "(None: every frame; cogvideox 49, wan 81: 1 + 4k frames)", default=None
    )
    fps: float | None = _help("resample clips to this frame rate first (None: the clip's own rate; cogvideox 8, wan 16)", default=None)
    height: int | None = _help("frame height clips are resized and centre-cropped to (None: model.resolution)", default=None)
    width: int | None = _help("frame width clips are resized and centre-cropped to (None: model.resolution)", default=None)

    def __post_init__(self) -> None:
        for name in ("num_frames", "height", "width"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SipoError(f"data.{name} must be a positive integer or null, got {getattr(self, name)}")
        if self.fps is not None and self.fps <= 0:
            raise SipoError(f"data.fps must be positive or null, got {self.fps}")
        _choice("data.format", self.format, ("pickapic", "jsonl"))
        _choice("data.shuffle", self.shuffle, ("block", "full"))
        if self.max_pairs is not None and self.max_pairs <= 0:
            raise SipoError("data.max_pairs must be a positive integer or null")


@dataclass
class ObjectiveConfig:
    name: str = _help(f"objective preset: one of {list(OBJECTIVE_PRESETS)}", default="sipo")
    beta: float = _help("KL strength, official Diffusion-DPO scaling z = -0.5*beta*delta (SPEC 2)", default=5000.0)
    mask: bool | None = _help("override the preset: mask pairs with w < tau or t outside [t_min, t_max]", default=None)
    clip: bool | None = _help("override the preset: clamp weights to [w_floor, w_clip]", default=None)
    reweight: bool | None = _help("override the preset: weight each pair's loss by its (clipped) weight", default=None)
    tau: float = _help("mask threshold on the pair weight w (SPEC 4); see docs/defaults.md", default=0.5)
    t_min: int | None = _help("lowest timestep kept by the mask (None: 0)", default=None)
    t_max: int | None = _help("highest timestep kept by the mask (None: T-1)", default=None)
    w_clip: float | None = _help("upper clip of w (None: no upper clip)", default=2.0)
    w_floor: float = _help("lower clip of w", default=0.0)
    normalize: str = _help("self: divide by sum(mask*w_c); batch: divide by the batch size", default="self")
    weight_source: str = _help("sample: each pair's own w; timestep_ema: EMA of w in its timestep bucket", default="sample")
    ema_buckets: int = _help("timestep buckets over [0, T) for timestep_ema", default=20)
    ema_decay: float = _help("EMA decay for timestep_ema", default=0.99)
    weight_norm: str = _help("per-element mean or sum of the log weight over the D elements (SPEC 3)", default="mean")
    pair_weight: str = _help("combine winner and loser weights: product, min or mean", default="product")
    weight_model: str = _help("model whose prediction defines p_theta in w: policy or reference", default="policy")

    def __post_init__(self) -> None:
        _choice("objective.name", self.name, OBJECTIVE_PRESETS)
        _choice("objective.normalize", self.normalize, ("self", "batch"))
        _choice("objective.weight_source", self.weight_source, ("sample", "timestep_ema"))
        _choice("objective.weight_norm", self.weight_norm, ("mean", "sum"))
        _choice("objective.pair_weight", self.pair_weight, ("product", "min", "mean"))
        _choice("objective.weight_model", self.weight_model, ("policy", "reference"))
        if self.beta <= 0:
            raise SipoError(f"objective.beta must be positive, got {self.beta}")
        if self.w_clip is not None and self.w_clip < self.w_floor:
            raise SipoError("objective.w_clip must be >= objective.w_floor")
        if not 0.0 <= self.ema_decay < 1.0 or self.ema_buckets < 1:
            raise SipoError("objective.ema_decay must be in [0, 1) and objective.ema_buckets >= 1")

    def switches(self) -> dict[str, bool]:
        """The preset's mask/clip/reweight switches with any explicit overrides applied."""
        resolved = dict(OBJECTIVE_PRESETS[self.name])
        for key in resolved:
            value = getattr(self, key)
            if value is not None:
                resolved[key] = value
        return resolved


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
    checkpoint_every: int = _help("write a resumable checkpoint every N optimizer steps (0: only at the end)", default=500)
    keep_last: int = _help("checkpoints to keep", default=3)
    log_every: int = _help("TensorBoard scalars every N optimizer steps", default=10)
    max_bad_steps: int = _help("consecutive non-finite steps before the run stops", default=5)
    gradient_checkpointing: bool = _help("trade compute for memory in the denoiser", default=False)

    def __post_init__(self) -> None:
        _choice("train.lr_scheduler", self.lr_scheduler, ("constant", "linear", "cosine"))
        _choice("train.mixed_precision", self.mixed_precision, ("no", "fp16", "bf16"))
        _choice("train.finetune", self.finetune, ("lora", "full"))
        for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "keep_last", "log_every", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise SipoError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise SipoError(f"train.learning_rate must be positive, got {self.learning_rate}")
        if self.finetune == "lora" and self.lora_rank < 1:
            raise SipoError("train.lora_rank must be at least 1 for train.finetune=lora")


@dataclass
class SipoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a field annotation; ints become floats where a float is expected."""
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
    unknown = sorted(set(values) - set(fields))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise SipoError(
            f"unknown config key {prefix}{unknown[0]}; valid keys in {where}: {sorted(fields)}"
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
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return values


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> SipoConfig:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SipoError(f"config file {path} does not exist; pass --config with a YAML file from configs/")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise SipoError(f"config file {path} is not valid YAML ({error.__class__.__name__}); fix its syntax") from None
        if not isinstance(values, dict):
            raise SipoError(f"config file {path} must be a mapping of sections (model, data, objective, train)")
    values = apply_overrides(values, overrides or [])
    return _build(SipoConfig, values, "")


def config_from_dict(values: dict[str, Any]) -> SipoConfig:
    """Build and validate a config from a nested dict (as saved beside a run)."""
    return _build(SipoConfig, values, "")


def save_config(config: SipoConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (the file a run leaves beside its weights)."""
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
