"""The small protocol every model family implements.

An adapter knows how to load its family from a local diffusers directory, turn a batch of
preference pairs into clean model inputs ``x0`` (VAE latents, or pixels for the demo) plus
conditioning, and run the denoiser. It returns the raw prediction in the model's own target
space; the schedule (``sipo.schedules``) and the objectives (``sipo.objectives``) do all the math.
Adding a family is one file in this folder, one entry in ``FAMILIES`` and one YAML in configs/.
"""

from __future__ import annotations

import contextlib
import typing
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Mapping

import torch
from torch import Tensor, nn

from sipo.errors import SipoError
from sipo.schedules import GaussianSchedule, vp_schedule

Conditioning = dict[str, Tensor]


@dataclass
class EncodedPairs:
    """A batch of preference pairs in model space: ``x0`` for winner and loser, shared conditioning."""

    x0_winner: Tensor
    x0_loser: Tensor
    conditioning: Conditioning


def concat_conditioning(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditioning dicts along the batch so winner and loser share one forward pass."""
    return {key: torch.cat([first[key], second[key]], dim=0) for key in first}


def check_listed_components(path: Path, names: typing.Iterable[str]) -> None:
    """Each of ``names`` that ``model_index.json`` lists (``"name": [library, class]``, not ``[null, null]``)
    has its folder, as diffusers' ``from_pretrained`` requires: the components a family loads only where
    the index lists them (``DiffusionAdapter.listed_components``: Wan2.2-A14B's ``transformer_2``), whose
    folder lost to an interrupted download would otherwise load as a different model. Components sipo
    never loads (a safety checker left out of a download) are not asked for."""
    index = read_model_index(path)
    for name in names:
        entry = index.get(name)
        listed = isinstance(entry, (list, tuple)) and len(entry) == 2 and all(isinstance(part, str) for part in entry)
        if listed and not (path / name).is_dir():
            raise SipoError(
                f"{path}/model_index.json lists {name} ({entry[1]}), but {path} has no {name}/ folder (an interrupted "
                f"download?), and diffusers refuses such a directory too; download {name}/ again or point "
                "model.pretrained_path at a complete pipeline directory"
            )


def read_model_index(path: str | Path) -> dict[str, Any]:
    """The ``model_index.json`` of a diffusers pipeline directory, with a clear error if absent."""
    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise SipoError(
            f"model directory {path} does not exist; set model.pretrained_path to a local diffusers "
            "pipeline directory (the one containing model_index.json)"
        )
    if not index.is_file():
        raise SipoError(
            f"{path} has no model_index.json; point model.pretrained_path at a diffusers pipeline "
            "directory saved with save_pretrained"
        )
    try:
        values = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise SipoError(
            f"{index} is not readable JSON ({error.__class__.__name__}); restore it from the original "
            "pipeline (save_pretrained writes it) and point model.pretrained_path at that directory"
        ) from None
    if not isinstance(values, dict):
        raise SipoError(f"{index} is not a JSON object; restore it from the original pipeline")
    return values


def epsilon_or_v_schedule(family: str, scheduler: Any, num_inference_steps: int) -> GaussianSchedule:
    """The VP schedule of a diffusers scheduler (its ``alphas_cumprod``) for an epsilon- or
    v-prediction model; any other ``prediction_type`` stops with one sentence naming ``family``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise SipoError(
            f"the scheduler's prediction_type is {prediction_type!r}; the {family} family trains "
            "'epsilon' or 'v_prediction' models only: use a model with one of those"
        )
    return vp_schedule(scheduler.alphas_cumprod, prediction_type, num_inference_steps)


def require_flow_match_scheduler(family: str, scheduler: Any) -> None:
    """Stop in one sentence unless ``scheduler`` is a FlowMatch scheduler: a rectified-flow family's
    schedule and sampler are read from the model's own (the counterpart of :func:`epsilon_or_v_schedule`)."""
    if not type(scheduler).__name__.startswith("FlowMatch"):
        raise SipoError(f"the scheduler is a {type(scheduler).__name__}; the {family} family trains rectified-flow models: "
                        "use the model's own FlowMatchEulerDiscreteScheduler config")


def is_local_path(path: str | Path) -> bool:
    """A path we must find on disk (never sent to the hub): it exists, or it is written like a path."""
    text = str(path)
    return Path(text).exists() or text.startswith(("/", ".", "~")) or text.count("/") != 1


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers at all: one HEAD request, no retries.

    Through ``huggingface_hub``'s own HTTP session, so ``HF_ENDPOINT`` and proxy settings count as they
    do for the loaders. Any HTTP answer (even an error status) means the network is there; a DNS or
    connection failure returns in milliseconds on a machine without network, where the loaders
    themselves would retry for ~28 s before failing (measured: diffusers 0.42, huggingface_hub 2.4).
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # noqa: BLE001 - whatever the transport raises, the hub is out of reach
        return False
    return True


def require_hub_access(repo_id: str, what: str, fix: str, filename: str = "config.json") -> None:
    """Stop in seconds, with one sentence naming the network and ``HF_HUB_OFFLINE=1``, when ``repo_id``
    (a hub id, ``what`` says whose) cannot be fetched: offline mode without a cached copy, or no network.

    ``fix`` is the local alternative (e.g. "set model.pretrained_path to a local directory").
    With ``HF_HUB_OFFLINE=1`` a copy in the local hub cache (``filename`` of it) is used as the
    libraries would; without it and without network the libraries would retry for half a minute.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        # any file of the repo in the cache will do: offline, a missing one fails fast in the loader itself
        for name in dict.fromkeys((filename, "config.json", "model_index.json", "tokenizer_config.json")):
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return
        raise SipoError(
            f"{what} {repo_id} is a hub id that is not in the local hub cache, and HF_HUB_OFFLINE=1 keeps sipo "
            f"off the network; {fix}, or download it on a machine with network first"
        )
    if not hub_reachable():
        raise SipoError(
            f"{what} {repo_id} is a hub id, but the Hugging Face hub ({constants.ENDPOINT}) cannot be reached "
            f"from this machine (no network); {fix}, or set HF_HUB_OFFLINE=1 to use a copy in the local hub cache"
        )


def read_component_config(path: Path, subfolder: str) -> dict[str, Any] | None:
    """``<path>/<subfolder>/config.json`` as a dict, or None where absent or unreadable (its loader says why)."""
    file = Path(path) / subfolder / "config.json"
    try:
        values = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


class DiffusionAdapter(ABC):
    """One model family behind the interface the trainer, analysis and evaluation use."""

    family: ClassVar[str]
    #: ``_class_name`` values of ``model_index.json`` this family accepts.
    pipeline_class_names: ClassVar[tuple[str, ...]] = ()
    #: default LoRA target modules of the denoiser.
    lora_target_modules: ClassVar[tuple[str, ...]] = ()
    #: subfolder -> what it holds, for the "missing subfolder" error of ``check_pipeline_directory``.
    components: ClassVar[Mapping[str, str]] = {}
    #: where a complete directory comes from, the fix named by the "missing subfolder" error;
    #: ``None``: a complete ``pipeline_class_names[0]`` directory written by ``save_pretrained``.
    directory_hint: ClassVar[str | None] = None
    #: the family's sampler: the steps and guidance its ``sample()`` uses when given none, and so what
    #: eval, compare, pairs and validation samples use unless the user names a value (:meth:`sampler_defaults`)
    default_num_inference_steps: ClassVar[int] = 50
    default_guidance_scale: ClassVar[float] = 7.5
    #: components loaded only where model_index.json lists them (beyond ``components``): each listed one
    #: must have its folder (``check_listed_components``)
    listed_components: ClassVar[tuple[str, ...]] = ()

    #: subfolder -> {config.json key: the value every model of this family has}: what tells this
    #: family's component from another family's of the same class (an SDXL UNet is a
    #: UNet2DConditionModel like SD1.5's, but with addition_embed_type "text_time").
    component_config: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    #: (denoiser subfolder, its key, [text encoder subfolders]): the denoiser attends to text states
    #: as wide as the encoders' ``hidden_size`` summed (SDXL concatenates its two encoders').
    text_width_check: ClassVar[tuple[str, str, tuple[str, ...]] | None] = None
    #: the family edits or animates an input image (Qwen-Image-Edit, Wan image-to-video): every pair carries
    #: one, shared by both sides, and it is conditioning (``encode_inputs``), never part of the loss
    needs_input_image: ClassVar[bool] = False

    schedule: GaussianSchedule
    denoiser: nn.Module

    @property
    def some_parameters_sit_out_a_step(self) -> bool:
        """Whether a step's graph may leave some trainable parameters without a gradient (a model
        that routes each sample to one of several experts: Wan2.2-A14B). DDP must then be told to
        find them (``find_unused_parameters``), or it stops at the next step."""
        return False

    @classmethod
    def sampler_defaults(cls, model_config=None) -> dict[str, Any]:
        """``{"num_inference_steps": n, "guidance_scale": g}``: how this family samples when the user
        names no value (``model_config``: the run's ``ModelConfig``, for a family whose guidance is a
        training setting, FLUX's ``model.guidance``). The one place eval, compare, pairs and validation read."""
        return {"num_inference_steps": int(cls.default_num_inference_steps),
                "guidance_scale": float(cls.default_guidance_scale)}

    @classmethod
    def check_family(cls, path: str | Path) -> None:
        """Stop with one sentence when ``path`` holds another family's pipeline, or another family's
        component in one of its folders (``check_component_configs``)."""
        class_name = read_model_index(path).get("_class_name", "?")
        if class_name not in cls.pipeline_class_names:
            raise SipoError(
                f"{path} holds a {class_name}, not a {cls.family} model "
                f"({' or '.join(cls.pipeline_class_names)}); set model.family to the matching "
                "family or model.pretrained_path to a matching model"
            )
        check_listed_components(Path(path), cls.listed_components)
        cls.check_component_configs(Path(path))

    @classmethod
    def check_pipeline_directory(cls, path: str | Path) -> Path:
        """``path`` (``~`` expanded) after checking it holds this family and every one of ``components``.

        Stops with one sentence naming the first missing subfolder and where a complete directory
        comes from, before any loader meets the gap with a less helpful message.
        """
        path = Path(path).expanduser()
        cls.check_family(path)
        hint = cls.directory_hint or (
            f"a complete {cls.pipeline_class_names[0]} directory (pipe.save_pretrained(dir) writes one)"
        )
        for subfolder, holds in cls.components.items():
            if not (path / subfolder).is_dir():
                raise SipoError(
                    f"{path} has no {subfolder}/ folder ({holds}); point model.pretrained_path at {hint}"
                )
        return path

    @classmethod
    def check_component_configs(cls, path: Path) -> None:
        """Stop with one sentence when a component folder holds another model than this family's.

        Read from the components' ``config.json`` before any weights load, so a swapped-in component
        (an SDXL ``unet/`` in an SD1.5 directory) is named here instead of failing as a TypeError deep
        in the denoiser's forward pass. Three checks: the class ``model_index.json`` declares for the
        folder is the class its config names; the family's ``component_config`` values; and the
        denoiser's text width against the text encoders' (``text_width_check``).
        """
        index = read_model_index(path)
        source = cls.directory_hint or f"a complete {cls.pipeline_class_names[0]} directory"
        fix = f"take all component folders from one model ({source}), or set model.family to the family they belong to"
        for subfolder, declared in index.items():
            config = read_component_config(path, subfolder) if isinstance(declared, list) else None
            if config is None or len(declared) != 2 or "_class_name" not in config:
                continue
            if declared[1] is not None and config["_class_name"] != declared[1]:
                raise SipoError(
                    f"{path / subfolder} holds a {config['_class_name']}, but model_index.json declares a "
                    f"{declared[1]} there; {fix}"
                )
        for subfolder, expected in cls.component_config.items():
            config = read_component_config(path, subfolder)
            if config is None:
                continue
            for key, value in expected.items():
                if config.get(key) != value:
                    raise SipoError(
                        f"{path / subfolder} is not a {cls.family} {subfolder} (its config.json has {key}="
                        f"{config.get(key)!r}, every {cls.family} model has {value!r}), probably another family's; {fix}"
                    )
        if cls.text_width_check is not None:
            denoiser, key, encoders = cls.text_width_check
            denoiser_config = read_component_config(path, denoiser)
            widths = [read_component_config(path, name) for name in encoders]
            if denoiser_config is None or any(w is None or "hidden_size" not in w for w in widths):
                return
            total = sum(int(w["hidden_size"]) for w in widths)
            width = denoiser_config.get(key)
            if not (width == total or isinstance(width, list) and all(w == total for w in width)):
                names = " + ".join(f"{name}/ {int(w['hidden_size'])}" for name, w in zip(encoders, widths))
                raise SipoError(
                    f"{path / denoiser} expects text states {denoiser_config.get(key)} wide ({key}), but the text "
                    f"encoders give {total} ({names}), so they come from different models; {fix}"
                )

    @classmethod
    def locate_pipeline(cls, path: str | Path) -> tuple[str, dict[str, Any]]:
        """``(source, model_index)`` for a local directory (checked by ``check_pipeline_directory``) or a hub id.

        A hub id (where online) must be reachable and hold this family's pipeline; ``source`` is
        what the component loaders take.
        """
        if is_local_path(path):
            directory = cls.check_pipeline_directory(path)
            return str(directory), read_model_index(directory)
        from diffusers import DiffusionPipeline

        require_hub_access(str(path), "model.pretrained_path", f"set model.pretrained_path to a local "
                           f"{cls.pipeline_class_names[0]} directory", filename="model_index.json")
        try:
            index = DiffusionPipeline.load_config(str(path))
        except OSError as error:
            raise SipoError(
                f"{path} is neither a local directory nor a reachable hub model ({error}); set "
                f"model.pretrained_path to a local {cls.pipeline_class_names[0]} directory"
            ) from error
        class_name = index.get("_class_name", "?")
        if class_name not in cls.pipeline_class_names:
            raise SipoError(
                f"{path} holds a {class_name}, not a {cls.family} model "
                f"({' or '.join(cls.pipeline_class_names)}); set model.family to the matching family"
            )
        return str(path), dict(index)

    @classmethod
    @abstractmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> "DiffusionAdapter":
        """Load every component from a local diffusers directory (or a hub id where online)."""

    #: images per VAE call in ``encode_images``: bounds the encoder's activation memory (a full
    #: batch of 16 images at 512 px in one fp32 call peaks at 12.5 GiB on an H200; chunks of 8 in
    #: bf16 at 3.3 GiB). Set from ``model.encode_chunk_size``.
    encode_chunk_size: int = 8

    def encode_images(self, pictures: Tensor) -> Tensor:
        """Pictures in ``[-1, 1]`` (``[N, 3, H, W]`` or ``[N, F, 3, H, W]``) -> float32 model-space ``x0``.

        No grad; in chunks of ``encode_chunk_size`` (see ``encode_in_chunks``).
        """
        raise NotImplementedError(f"the {self.family} adapter has no encode_images")

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Prompts -> conditioning (a dict of ``[N, ...]`` tensors), no grad."""
        raise NotImplementedError(f"the {self.family} adapter has no encode_prompts")

    def encode_inputs(self, prompts: list[str], input_images: Tensor, num_frames: int | None = None) -> Conditioning:
        """Prompts and their pairs' input images (``[N, 3, H, W]`` in ``[-1, 1]``) -> conditioning, no grad:
        what a conditioned family (``needs_input_image``) encodes in place of ``encode_prompts``. ``num_frames``:
        the pairs' clip length (video families; ``None`` for pictures)."""
        raise NotImplementedError(f"the {self.family} adapter takes no input image")

    def check_input_images(self, input_images: Tensor | None) -> None:
        """One sentence when pairs with (or without) input images meet a family that does not (or does) take them."""
        if self.needs_input_image and input_images is None:
            raise SipoError(f"the {self.family} family edits or animates an input image, and these pairs have none; add "
                            "an input_image to every pair (docs/data.md) or use a text-to-image or text-to-video family")
        if not self.needs_input_image and input_images is not None:
            raise SipoError(f"these pairs carry input images, and the {self.family} family generates from text alone; "
                            "use a family that takes one (qwenimage_edit, wan_i2v) or drop the input_image column")

    def encode(
        self, prompts: list[str], winners: Tensor, losers: Tensor, size_info: Tensor | None = None,
        input_images: Tensor | None = None,
    ) -> EncodedPairs:
        """Images/videos in ``[-1, 1]`` (``[B, C, H, W]`` or ``[B, F, C, H, W]``) -> ``x0`` + conditioning.

        Runs frozen encoders only, under ``no_grad``: winners and losers go through one chunked
        ``encode_images`` call, prompts through ``encode_prompts``, then ``pair_conditioning``
        adds what depends on each pair's pictures. ``size_info`` (``[B, 4]``: original
        height/width, crop top/left) is for families whose conditioning needs it (SDXL); others
        ignore it. ``input_images`` (``[B, 3, H, W]``) are the pairs' shared input images, for the families
        that need one (``encode_inputs`` then encodes them with the prompts).
        """
        self.check_input_images(input_images)
        if len(prompts) != winners.shape[0] or winners.shape != losers.shape:
            raise ValueError(
                f"{len(prompts)} prompts, winners {tuple(winners.shape)}, losers {tuple(losers.shape)}: "
                "expected one prompt per pair and equal-shaped images or videos"
            )
        with torch.no_grad():
            latents = self.encode_images(torch.cat([winners, losers], dim=0))
            if input_images is None:
                conditioning = self.encode_prompts(list(prompts))
            else:
                frames = int(winners.shape[1]) if winners.ndim == 5 else None
                conditioning = self.encode_inputs(list(prompts), input_images, num_frames=frames)
        x0_winner, x0_loser = latents.chunk(2, dim=0)
        height, width = winners.shape[-2:]
        conditioning = self.pair_conditioning(conditioning, size_info, int(height), int(width))
        return EncodedPairs(x0_winner=x0_winner, x0_loser=x0_loser, conditioning=conditioning)

    def pair_conditioning(
        self, conditioning: Conditioning, size_info: Tensor | None, height: int, width: int
    ) -> Conditioning:
        """The prompts' conditioning plus what depends on the pairs' pictures (``height`` x ``width``,
        ``size_info`` as in ``encode``). Default: the prompts' conditioning unchanged."""
        return conditioning

    @abstractmethod
    def predict(
        self, x_t: Tensor, timesteps: Tensor, conditioning: Conditioning, denoiser: nn.Module | None = None
    ) -> Tensor:
        """The denoiser's output at ``(x_t, t)`` in its own target space (eps, v or flow u).

        ``denoiser`` defaults to ``self.denoiser``; the trainer passes a frozen copy for the
        reference model of a full fine-tune.
        """

    @abstractmethod
    def save_lora(self, output_dir: str | Path, lora_state_dict: dict[str, Tensor]) -> None:
        """Write LoRA weights so the family's diffusers pipeline loads them with ``load_lora_weights``."""

    def save_full(self, output_dir: str | Path) -> None:
        """Write the fine-tuned denoiser in diffusers format (``save_pretrained``, safetensors)."""
        self.denoiser.save_pretrained(Path(output_dir) / "unet", safe_serialization=True)

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that never train (VAE, text encoders); the trainer freezes and casts them."""
        return []

    def keep_fp32_modules(self) -> list[nn.Module]:
        """Frozen modules that must stay float32 when the trainer casts frozen weights to the
        compute dtype (e.g. a VAE that overflows in fp16). Default: none."""
        return []

    def lora_config_dict(self) -> dict[str, Any] | None:
        """The denoiser's peft ``LoraConfig`` as a JSON-safe dict (``None`` without one).

        Saved beside LoRA weights: without ``lora_alpha`` a loader assumes ``alpha == r`` and a
        LoRA trained with another alpha would load at the wrong scale.
        """
        configs = getattr(self.denoiser, "peft_config", None) or {}
        config = configs.get("default") if "default" in configs else next(iter(configs.values()), None)
        if config is None:
            return None
        # JSON round trip: sets -> lists, enums -> their string values.
        as_json = json.dumps(config.to_dict(), default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        return json.loads(as_json)

    def freeze_encoders(self) -> None:
        """Freeze the modules that never train and put them in eval mode."""
        for module in self.frozen_modules():
            module.requires_grad_(False).eval()

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    def to(self, device: torch.device | str) -> "DiffusionAdapter":
        self.denoiser.to(device)
        for module in self.frozen_modules():
            module.to(device)
        return self


def check_lora_state_dict(lora_state_dict: dict[str, Tensor]) -> None:
    """``save_lora`` takes ``peft.utils.get_peft_model_state_dict(denoiser)``: LoRA tensors only."""
    not_lora = [key for key in lora_state_dict if "lora" not in key]
    if not lora_state_dict or not_lora:
        raise ValueError(
            "save_lora expects peft.utils.get_peft_model_state_dict(unet); "
            f"got {len(lora_state_dict)} keys, non-LoRA ones: {not_lora[:3]}"
        )


def add_lora(adapter: DiffusionAdapter, config) -> None:
    """Inject trainable LoRA layers (peft) into the denoiser; everything else is frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = config.train.lora_target_modules or list(adapter.lora_target_modules)
    lora_config = LoraConfig(
        r=config.train.lora_rank,
        lora_alpha=config.train.lora_alpha,
        target_modules=targets,
        init_lora_weights="gaussian",
    )
    adapter.denoiser.requires_grad_(False)
    try:
        inject_adapter_in_model(lora_config, adapter.denoiser)
    except ValueError as error:
        raise SipoError(
            f"LoRA target modules {targets} were not found in the {adapter.family} denoiser; "
            "set train.lora_target_modules to module names it has"
        ) from error
    for name, param in adapter.denoiser.named_parameters():
        param.requires_grad_("lora_" in name)


@contextlib.contextmanager
def lora_disabled(module: nn.Module) -> Iterator[None]:
    """Run ``module`` as its base model: every peft LoRA layer switched off, then back on.

    This is the LoRA reference model of Diffusion-DPO without a second copy of the weights.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in module.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def encode_in_chunks(encode_chunk, pictures: Tensor, chunk_size: int) -> Tensor:
    """``torch.cat([encode_chunk(part) for part in pictures.split(chunk_size)])`` under ``no_grad``.

    Peak activation memory of a VAE grows with the images per call; the result is the same.
    """
    chunk_size = max(1, int(chunk_size))
    with torch.no_grad():
        return torch.cat([encode_chunk(part) for part in pictures.split(chunk_size)], dim=0)


def hold_frozen_weights_in(adapter: DiffusionAdapter, dtype: torch.dtype) -> None:
    """Cast every frozen weight to ``dtype`` (the run's compute dtype); trainable ones stay float32.

    Frozen: the encoders (``frozen_modules``) except ``keep_fp32_modules``, and the denoiser's base
    weights when only LoRA trains (the reference is that base with adapters off, so it sees the same
    cast). Under autocast the matmuls run in ``dtype`` either way; holding the weights in it halves
    their memory and skips a cast per layer per call. Trainable parameters (LoRA, or the whole
    denoiser of a full fine-tune) and so the optimizer state stay float32, as mixed precision needs.
    A full fine-tune's reference is a copy of the policy made after this, in the policy's dtypes.
    """
    keep = {id(module) for module in adapter.keep_fp32_modules()}
    for module in adapter.frozen_modules():
        if id(module) not in keep:
            module.to(dtype)
    trainable = [p for p in adapter.denoiser.parameters() if p.requires_grad]
    if len(trainable) < sum(1 for _ in adapter.denoiser.parameters()):
        adapter.denoiser.to(dtype)
        for param in trainable:
            param.data = param.data.float()


#: values of ``model.frozen_dtype``: how the frozen base of a LoRA run is stored.
FROZEN_DTYPES = ("bf16", "fp8")


def store_frozen_base_in(adapter: DiffusionAdapter, frozen_dtype: str, compute_dtype: torch.dtype) -> list[str]:
    """Store the denoiser's frozen base weights in float8 (``frozen_dtype="fp8"``); ``"bf16"`` changes nothing.

    ``"bf16"`` is the behaviour of ``hold_frozen_weights_in``: frozen weights in the run's compute
    dtype. ``"fp8"`` goes further through diffusers' layerwise casting
    (``ModelMixin.enable_layerwise_casting``, diffusers/hooks/layerwise_casting.py): every Linear /
    Conv weight of the base is stored as ``float8_e4m3fn`` and upcast to ``compute_dtype`` for the
    layer's forward only (one layer at a time), then cast back. Skipped, as diffusers skips them by
    default: each model's ``_skip_layerwise_casting_patterns`` (norms, embeddings), the default
    patterns (``pos_embed``, ``patch_embed``, ``norm``, ``proj_in``/``proj_out``) and every peft
    adapter layer, so the LoRA weights stay float32 and trainable. The policy and the reference
    (the same module with adapters off, ``lora_disabled``) therefore see one and the same cast base.

    Applied to each diffusers model inside the denoiser (the denoiser itself, or the experts of a
    two-expert denoiser such as Wan2.2-A14B's). Returns the class names it was applied to. A full
    fine-tune has no frozen base: ``fp8`` then stops with one sentence.
    """
    if frozen_dtype not in FROZEN_DTYPES:
        raise SipoError(f"model.frozen_dtype={frozen_dtype!r} is not valid; choose one of {list(FROZEN_DTYPES)}")
    if frozen_dtype == "bf16":
        return []
    from diffusers import ModelMixin

    parameters = list(adapter.denoiser.parameters())
    if all(p.requires_grad for p in parameters):
        raise SipoError(
            "model.frozen_dtype=fp8 stores the frozen base of a LoRA run, and a full fine-tune trains every "
            "weight; set train.finetune=lora or model.frozen_dtype=bf16"
        )
    denoiser = adapter.denoiser
    models = [denoiser] if isinstance(denoiser, ModelMixin) else [m for m in denoiser.children() if isinstance(m, ModelMixin)]
    if not models:
        raise SipoError(f"the {adapter.family} denoiser holds no diffusers model to cast; set model.frozen_dtype=bf16")
    for model in models:
        model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return [type(model).__name__ for model in models]
