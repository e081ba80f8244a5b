"""Loading diffusion models: the embedded ones, hub ids and local folders, through one code path.

Both the ``DDPMPipeline`` layout (``unet/``, ``scheduler/``) and the flat layout of
google/ddpm-cifar10-32 (``config.json``, weights and ``scheduler_config.json`` at
the root) load with diffusers' ``from_pretrained``. Nothing is unpickled:
safetensors are preferred, and diffusers reads ``.bin`` files with
``weights_only=True``. Offline, a missing checkpoint is one line that says what
to download and where to put it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import CMStochasticIterativeScheduler, DDPMScheduler, ScoreSdeVeScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import snapshot_download

from bench import reuse
from bench.catalog import MODELS
from bench.errors import BenchError
from bench.files import file_digest
from bench.interfaces import DiffusionModel, FlowMatchingModel, SDXLModel, TextToImageModel

EMBEDDED_WEIGHTS = Path(__file__).resolve().parent / "embedded" / "weights"
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# hub repositories that need their license accepted on the hub before `hf download` works
GATED = {"stabilityai/stable-diffusion-3-medium-diffusers", "black-forest-labs/FLUX.1-dev"}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def resolve_folder(source: str) -> Path:
    """A local folder as is; a hub id through the local Hugging Face cache (downloading when online)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BenchError(f"model path {source} is not a folder (expected a save_pretrained folder)")
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        try:
            recipe = path.resolve().relative_to(EMBEDDED_WEIGHTS.resolve()).as_posix()
        except ValueError:
            raise BenchError(f"model folder {source} does not exist") from None
        raise BenchError(f"embedded model folder {source} does not exist: train it with "
                         f"`bench embedded train {recipe}` (its recipe and budget: bench/recipes, bench/embedded)")

    try:
        return Path(
            snapshot_download(
                source,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "**/*.json", "**/*.safetensors", "**/*.txt",
                                "**/spiece.model"],  # spiece.model: T5's sentencepiece vocabulary (SD3, FLUX)
            )
        )
    except Exception:  # offline, unknown repo, gated: all mean the files are not here
        gated = (" (a gated repository: accept its license on huggingface.co and `hf auth login` first)"
                 if source in GATED else "")
        raise BenchError(
            f"model {source} is not in the local Hugging Face cache and cannot be downloaded here: "
            f"run `hf download {source}` on a machine with network access{gated} (HF_HOME={_hf_home()}), "
            f"or save it with save_pretrained to a folder and pass --model PATH"
        ) from None


@contextlib.contextmanager
def quiet_loading():
    """No library warnings while weights load: a pickle ``.bin`` refused by ``weights_only=True`` makes torch warn
    before it raises, and the one line the user sees is the BenchError that follows."""
    import io
    import warnings

    from bench.files import quiet_loggers

    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
            quiet_loggers("diffusers", "transformers", "torch"):
        warnings.simplefilter("ignore")
        yield


def _hf_home() -> str:
    return os.environ.get("HF_HOME", str(Path("~/.cache/huggingface").expanduser()))


STUDENT_FILE = "distillation.json"  # a distilled student's card (issue 14): what it was distilled from, for which steps


def read_student(folder: Path) -> dict[str, Any] | None:
    """A few-step student's ``distillation.json`` (written by its recipe beside model_index.json): ``method`` (the
    paper's adapter), ``steps`` (the step counts it was distilled for; null: any), ``teacher``, ``budget`` (its
    training steps and seconds) and what else the method records; None for a model that is not a student."""
    path = Path(folder) / STUDENT_FILE
    if not path.exists():
        return None
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(card, dict) or "method" not in card:
        raise BenchError(f"{path} does not say which distillation made the model (no \"method\")")
    return card


# the pixel model kinds a scheduler config's _class_name names (any other: a DDPM-family epsilon / v model)
PIXEL_KINDS = {"CMStochasticIterativeScheduler": "consistency", "ScoreSdeVeScheduler": "score-ve"}
SCHEDULER_OF_KIND = {"pixel-diffusion": DDPMScheduler, "consistency": CMStochasticIterativeScheduler,
                     "score-ve": ScoreSdeVeScheduler}


def load_pixel_diffusion(source: str, name: str | None = None, embedded: bool = False) -> DiffusionModel:
    """A ``UNet2DModel`` and its DDPM training schedule from a hub id or a folder, in either layout (loaded once
    per process while its files are unchanged; each call gets its own copy: bench.reuse)."""
    folder = resolve_folder(source)
    key = ("pixel-diffusion", str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_pixel_diffusion(folder, source, name, embedded))


def _load_pixel_diffusion(folder: Path, source: str, name: str | None, embedded: bool) -> DiffusionModel:
    nested = (folder / "unet" / "config.json").exists()
    unet_dir = folder / "unet" if nested else folder
    sched_dir = folder / "scheduler" if nested else folder
    if not (unet_dir / "config.json").exists():
        raise BenchError(f"{folder} is not a diffusers UNet2DModel folder (no config.json in it or in unet/)")
    weights = [p for p in unet_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not weights:
        raise BenchError(f"no weights file (*.safetensors or *.bin) in {unet_dir}")
    sched_file = sched_dir / "scheduler_config.json"
    try:
        sched_config = json.loads(sched_file.read_text())
    except FileNotFoundError:
        raise BenchError(f"no scheduler_config.json in {sched_dir}") from None
    except json.JSONDecodeError as exc:
        raise BenchError(f"{sched_file} is not valid JSON: {exc}") from None
    if "timesteps" in sched_config and "num_train_timesteps" not in sched_config:  # legacy key (ddpm-cifar10-32)
        sched_config["num_train_timesteps"] = sched_config.pop("timesteps")
    try:
        with quiet_loading():
            unet = UNet2DModel.from_pretrained(unet_dir,
                                               use_safetensors=any(p.suffix == ".safetensors" for p in weights))
        # a consistency model (Song et al. 2023; openai/diffusers-cd_imagenet64_l2's layout) keeps its sigma grid; a
        # variance-exploding score model (Song et al. 2021; google/ncsnpp-*'s ScoreSdeVePipeline layout) its sigmas
        kind = PIXEL_KINDS.get(sched_config.get("_class_name"), "pixel-diffusion")
        scheduler = SCHEDULER_OF_KIND[kind].from_config(sched_config)
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {unet_dir}: {_first_line(exc)}") from None
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    student = read_student(folder)
    return DiffusionModel(
        name=name or source,
        source=str(source),
        digest=file_digest(weights + ([folder / STUDENT_FILE] if student else []),
                           extra={"unet": dict(unet.config), "scheduler": config}),
        extra={"distillation": student} if student else {},
        kind=kind,
        unet=unet.eval().requires_grad_(False),
        scheduler_config=config,
        sample_shape=(unet.config.in_channels, h, w),  # out_channels is twice that where variances are learned
        embedded=embedded,
    )


def embedded_pixel_ddpm() -> DiffusionModel:
    """pixel DDPM of the shapes world (16x16, UNet2DModel 1.1M params, committed safetensors)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm"), name="embedded-ddpm", embedded=True)


def embedded_pixel_ddpm_zsnr() -> DiffusionModel:
    """the same pixel DDPM trained with zero-terminal-SNR betas and v-prediction (Lin et al. 2023)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm-zsnr"), name="embedded-ddpm-zsnr", embedded=True)


def _embedded_pd(steps: int) -> DiffusionModel:
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "progressive-distillation" / f"steps-{steps}"),
                                name=f"embedded-pd-{steps}", embedded=True)


def embedded_pd_4() -> DiffusionModel:
    """the pixel DDPM progressively distilled to 4 DDIM steps (Salimans and Ho 2022; v-prediction; committed)"""
    return _embedded_pd(4)


def embedded_pd_2() -> DiffusionModel:
    """the pixel DDPM progressively distilled to 2 DDIM steps (Salimans and Ho 2022; v-prediction; committed)"""
    return _embedded_pd(2)


def embedded_pd_1() -> DiffusionModel:
    """the pixel DDPM progressively distilled to 1 DDIM step (Salimans and Ho 2022; v-prediction; committed)"""
    return _embedded_pd(1)


def embedded_cd() -> DiffusionModel:
    """the pixel DDPM's consistency-distilled student (Song et al. 2023; ConsistencyModelPipeline layout; committed)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "consistency-distillation"), name="embedded-cd", embedded=True)


def embedded_ncsn() -> DiffusionModel:
    """variance-exploding score model of the shapes world (16x16, Fourier sigma features; ScoreSdeVePipeline layout)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "ncsn"), name="embedded-ncsn", embedded=True)


def embedded_iddpm() -> DiffusionModel:
    """Improved DDPM of the shapes world: cosine schedule, learned variances, hybrid loss (Nichol and Dhariwal 2021)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "iddpm"), name="embedded-iddpm", embedded=True)


def embedded_iddpm_linear() -> DiffusionModel:
    """embedded-iddpm's twin with the linear schedule (learned variances, hybrid loss, the same budget)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "iddpm-linear"), name="embedded-iddpm-linear", embedded=True)


def ncsnpp_celebahq_256() -> DiffusionModel:
    """Song et al.'s NCSN++ (VE SDE) on CelebA-HQ 256, ScoreSdeVePipeline; needs the download"""
    model = load_pixel_diffusion("google/ncsnpp-celebahq-256", name="google/ncsnpp-celebahq-256")
    model.extra["data_range"] = (0.0, 1.0)  # score_sde_pytorch's VE models see data in [0, 1] (not centered)
    return model


def cd_imagenet64_l2() -> DiffusionModel:
    """openai's consistency-distilled ImageNet 64 model, L2 metric (Song et al. 2023); needs the download"""
    return load_pixel_diffusion("openai/diffusers-cd_imagenet64_l2", name="openai/diffusers-cd_imagenet64_l2")


def ddpm_cifar10() -> DiffusionModel:
    """Ho et al.'s CIFAR-10 DDPM (35.7M params); needs the download"""
    return load_pixel_diffusion("google/ddpm-cifar10-32", name="google/ddpm-cifar10-32")


# -- text-to-image: StableDiffusionPipeline folders -------------------------------------------------------------------
SD_WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                   "text_encoder/model.safetensors")
SD_TOKENIZER_FILES = ("tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer/tokenizer.json")


def pipeline_class(folder: Path) -> str | None:
    """The ``_class_name`` of a diffusers pipeline folder's model_index.json, or None."""
    try:
        return json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


@contextlib.contextmanager
def _quiet_loading():
    """No per-component loading bars from diffusers and transformers: a run prints its own progress."""
    from transformers.utils import logging as transformers_logging

    was = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            diffusers_logging.enable_progress_bar()
        if was[1]:
            transformers_logging.enable_progress_bar()


def load_text_to_image(source: str, name: str | None = None, embedded: bool = False) -> TextToImageModel:
    """A ``StableDiffusionPipeline`` folder or hub id, loaded as SD-1.5 is: ``from_pretrained``, no safety checker
    (loaded once per process while its files are unchanged; each call gets its own copy: bench.reuse)."""
    folder = resolve_folder(source)
    key = ("text-to-image", str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_text_to_image(folder, source, name, embedded))


# SD-1.x's layout; an LCM folder (SimianLuo/LCM_Dreamshaper_v7, the embedded LCM) has the same components and an
# LCMScheduler
SD_PIPELINES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")


def _load_text_to_image(folder: Path, source: str, name: str | None, embedded: bool) -> TextToImageModel:
    class_name = pipeline_class(folder)
    if class_name not in SD_PIPELINES:
        raise BenchError(f"{folder} is not a StableDiffusionPipeline folder (model_index.json names "
                         f"{class_name})")
    missing = [f for f in SD_WEIGHT_FILES if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder} lacks {', '.join(missing)} (safetensors weights are required; nothing is unpickled)")
    # imported here: the pipeline pulls in transformers and diffusers' loaders (seconds), which runs of pixel models
    # (and every Ray or Slurm worker that makes them) do not need
    import diffusers

    try:
        with _quiet_loading():
            pipe = getattr(diffusers, class_name).from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False, dtype=torch.float32, use_safetensors=True
            )
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {folder}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    files = [folder / f for f in SD_WEIGHT_FILES + SD_TOKENIZER_FILES + (STUDENT_FILE,) if (folder / f).exists()]
    student = read_student(folder)
    return TextToImageModel(**_latent_t2i_fields(pipe, files, source, name, embedded), kind="text-to-image",
                            extra={"distillation": student} if student else {})


def _scheduler_config(pipe) -> dict:
    config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    config["_class_name"] = type(pipe.scheduler).__name__
    return config


def _latent_t2i_fields(pipe, files: list[Path], source: str, name: str | None, embedded: bool) -> dict[str, Any]:
    """What a latent UNet text-to-image model (SD-1.x, SDXL) is made of, read from its loaded pipeline; the digest
    covers the weight and tokenizer files, the scheduler config and the VAE's scaling factor."""
    scheduler_config = _scheduler_config(pipe)
    latent = pipe.unet.config.sample_size
    latent_hw = (latent, latent) if isinstance(latent, int) else tuple(latent)
    factor = pipe.vae_scale_factor
    return dict(
        name=name or source,
        source=str(source),
        digest=file_digest(files, extra={"scheduler": scheduler_config,
                                         "vae_scaling_factor": pipe.vae.config.scaling_factor}),
        unet=pipe.unet,
        scheduler_config=scheduler_config,
        sample_shape=(3, latent_hw[0] * factor, latent_hw[1] * factor),
        embedded=embedded,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        latent_shape=(pipe.unet.config.in_channels, *latent_hw),
        pipeline=pipe,
    )


def embedded_t2i() -> TextToImageModel:
    """tiny latent text-to-image StableDiffusionPipeline of the shapes world (32x32, 4x8x8 latents; committed safetensors)"""
    return load_text_to_image(str(EMBEDDED_WEIGHTS / "t2i"), name="embedded-t2i", embedded=True)


def embedded_guided_distillation() -> TextToImageModel:
    """embedded-t2i's guided-distillation student (Meng et al. 2023, stage one): the guidance weight w as an input, one forward pass per step"""
    return load_text_to_image(str(EMBEDDED_WEIGHTS / "guided-distillation"), name="embedded-guided-distillation",
                              embedded=True)


def embedded_guided_distillation_4() -> TextToImageModel:
    """the guided-distillation student progressively distilled to 4 DDIM steps (Meng et al. 2023, stage two; v-prediction, trailing)"""
    return load_text_to_image(str(EMBEDDED_WEIGHTS / "guided-distillation-4"), name="embedded-guided-distillation-4",
                              embedded=True)


def embedded_lcm() -> TextToImageModel:
    """embedded-t2i's latent consistency model (Luo et al. 2023: LatentConsistencyModelPipeline, w-embedding, LCMScheduler; committed)"""
    return load_text_to_image(str(EMBEDDED_WEIGHTS / "lcm"), name="embedded-lcm", embedded=True)


def stable_diffusion_v1_5() -> TextToImageModel:
    """Stable Diffusion v1.5 (Rombach et al. 2022), 512x512; needs the download"""
    return load_text_to_image("stable-diffusion-v1-5/stable-diffusion-v1-5", name="stable-diffusion-v1-5/stable-diffusion-v1-5")


# -- today's families: SDXL (micro-conditioning), SD3 and FLUX (flow matching) -----------------------------------------
# the weights each pipeline needs, as safetensors (one file or shards) in its component folders
PIPELINE_WEIGHTS = {
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "text_encoder_2"),
    "StableDiffusion3Pipeline": ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"),
    "FluxPipeline": ("transformer", "vae", "text_encoder", "text_encoder_2"),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "spiece.model", "special_tokens_map.json",
                   "tokenizer_config.json")


def _pipeline_files(folder: Path, class_name: str) -> list[Path]:
    """The safetensors of every component the pipeline needs, and its tokenizer files; BenchError for a missing one."""
    files, missing = [], []
    left_out = left_out_components(folder)
    for part in PIPELINE_WEIGHTS[class_name]:
        if part in left_out:  # a component the folder leaves out (SD3 without T5)
            continue
        found = sorted((folder / part).glob("*.safetensors"))
        # a variant (fp16) beside the full-precision file: the digest covers what from_pretrained loads
        plain = [f for f in found if f.name.count(".") == 1]
        files += plain or found
        if not found:
            missing.append(f"{part}/*.safetensors")
    if missing:
        raise BenchError(f"{folder} lacks {', '.join(missing)} (safetensors weights are required; nothing is unpickled)")
    for tok in sorted(folder.glob("tokenizer*")):
        files += [tok / f for f in TOKENIZER_FILES if (tok / f).exists()]
    return files


def left_out_components(folder: Path) -> dict[str, None]:
    """The components a pipeline folder's model_index.json sets to null (SD3 without T5: ``text_encoder_3`` and
    ``tokenizer_3``), as the None keyword arguments ``from_pretrained`` needs for them (diffusers' SD3 docs)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: None for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None}


def _from_pretrained(pipeline_cls, folder: Path, source: str, name: str | None):
    try:
        with _quiet_loading(), quiet_loading():
            pipe = pipeline_cls.from_pretrained(folder, dtype=torch.float32, use_safetensors=True,
                                                **left_out_components(folder))
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {folder}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    return pipe


def load_sdxl(source: str, name: str | None = None, embedded: bool = False) -> SDXLModel:
    """A ``StableDiffusionXLPipeline`` folder or hub id, loaded as SDXL is: ``from_pretrained``, float32 (loaded once
    per process while its files are unchanged; each call gets its own copy: bench.reuse)."""
    folder = resolve_folder(source)
    key = ("sdxl", str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_sdxl(folder, source, name, embedded))


def _load_sdxl(folder: Path, source: str, name: str | None, embedded: bool) -> SDXLModel:
    if pipeline_class(folder) != "StableDiffusionXLPipeline":
        raise BenchError(f"{folder} is not a StableDiffusionXLPipeline folder (model_index.json names "
                         f"{pipeline_class(folder)})")
    files = _pipeline_files(folder, "StableDiffusionXLPipeline")
    from diffusers import StableDiffusionXLPipeline  # lazy: see _load_text_to_image

    pipe = _from_pretrained(StableDiffusionXLPipeline, folder, source, name)
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise BenchError(f"{folder}: a StableDiffusionXLPipeline needs text_encoder and text_encoder_2 (the refiner's "
                         f"layout, text_encoder_2 alone, is not a text-to-image base model)")
    return SDXLModel(**_latent_t2i_fields(pipe, files, source, name, embedded), kind="text-to-image-xl",
                     text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)


DEFAULT_MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline.__call__'s default (the SD3 branch of the flow loop)


def load_flow_matching(source: str, name: str | None = None, embedded: bool = False,
                       max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> FlowMatchingModel:
    """A ``StableDiffusion3Pipeline`` or ``FluxPipeline`` folder or hub id: a flow-matching model (velocity
    prediction, the folder's FlowMatchEulerDiscreteScheduler config), loaded with ``from_pretrained`` in float32
    (once per process while its files are unchanged; each call gets its own copy: bench.reuse).
    ``max_sequence_length``: the T5 tokens the model was trained with (the pipelines' argument; part of the digest
    where it is not the default)."""
    folder = resolve_folder(source)
    key = ("flow-matching", str(source), name, embedded, max_sequence_length, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_flow_matching(folder, source, name, embedded, max_sequence_length))


def _load_flow_matching(folder: Path, source: str, name: str | None, embedded: bool,
                        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH) -> FlowMatchingModel:
    class_name = pipeline_class(folder)
    if class_name not in ("StableDiffusion3Pipeline", "FluxPipeline"):
        raise BenchError(f"{folder} is not a StableDiffusion3Pipeline or FluxPipeline folder (model_index.json names "
                         f"{class_name})")
    files = _pipeline_files(folder, class_name)
    import diffusers  # lazy: see _load_text_to_image

    pipe = _from_pretrained(getattr(diffusers, class_name), folder, source, name)
    scheduler_config = _scheduler_config(pipe)
    if scheduler_config["_class_name"] != "FlowMatchEulerDiscreteScheduler":
        raise BenchError(f"{folder}/scheduler is a {scheduler_config['_class_name']}, not the "
                         f"FlowMatchEulerDiscreteScheduler of a flow-matching model")
    factor = pipe.vae_scale_factor
    latent_channels = pipe.vae.config.latent_channels
    side = pipe.default_sample_size  # latent side of the pipeline's default size (128: 1024 px for SD3 and FLUX.1)
    family = "flux" if class_name == "FluxPipeline" else "sd3"  # FLUX's transformer sees 2x2 latent patches as tokens
    encoders = tuple(m for m in (pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)) if m)
    tokenizers = tuple(t for t in (pipe.tokenizer, pipe.tokenizer_2, getattr(pipe, "tokenizer_3", None)) if t)
    return FlowMatchingModel(
        name=name or source,
        source=str(source),
        digest=file_digest(files, extra={"scheduler": scheduler_config, "vae": dict(pipe.vae.config),
                                         **({} if max_sequence_length == DEFAULT_MAX_SEQUENCE_LENGTH
                                            else {"max_sequence_length": max_sequence_length})}),
        kind="flow-matching",
        max_sequence_length=max_sequence_length,
        unet=pipe.transformer,
        scheduler_config=scheduler_config,
        sample_shape=(3, side * factor, side * factor),
        embedded=embedded,
        family=family,
        vae=pipe.vae,
        text_encoders=encoders,
        tokenizers=tokenizers,
        latent_shape=(latent_channels, side, side),
        pipeline=pipe,
    )


def embedded_sdxl() -> SDXLModel:
    """tiny StableDiffusionXLPipeline of the shapes world with SDXL's micro-conditioning (32x32; committed safetensors)"""
    return load_sdxl(str(EMBEDDED_WEIGHTS / "sdxl"), name="embedded-sdxl", embedded=True)


def _embedded_flow(folder: str, name: str) -> FlowMatchingModel:
    """An embedded SD3-layout flow: trained without T5 tokens, as its transformer/RECIPE.json records."""
    path = resolve_folder(str(EMBEDDED_WEIGHTS / folder))
    try:
        trained = json.loads((path / "transformer" / "RECIPE.json").read_text())["max_sequence_length"]
    except (OSError, json.JSONDecodeError, KeyError):
        raise BenchError(f"{path}/transformer/RECIPE.json does not say the model's max_sequence_length; retrain it "
                         f"with `bench embedded train {folder}`") from None
    return load_flow_matching(str(path), name=name, embedded=True, max_sequence_length=int(trained))


def embedded_flow() -> FlowMatchingModel:
    """tiny StableDiffusion3Pipeline (MMDiT) rectified flow of the shapes world, logit-normal t (32x32; committed)"""
    return _embedded_flow("flow", "embedded-flow")


def embedded_flow_reflow() -> FlowMatchingModel:
    """embedded-flow after one reflow (Liu et al. 2023: the 2-rectified flow of its own ODE's pairs; committed)"""
    return _embedded_flow("flow-reflow", "embedded-flow-reflow")


def embedded_flow_uniform() -> FlowMatchingModel:
    """embedded-flow's recipe with uniform t instead of logit-normal (Esser et al. 2024's baseline; committed)"""
    return _embedded_flow("flow-uniform", "embedded-flow-uniform")


def stable_diffusion_xl_base() -> SDXLModel:
    """SDXL base 1.0 (Podell et al. 2023), 1024x1024, micro-conditioning; needs the download"""
    return load_sdxl("stabilityai/stable-diffusion-xl-base-1.0", name="stabilityai/stable-diffusion-xl-base-1.0")


def stable_diffusion_3_medium() -> FlowMatchingModel:
    """SD3 medium (Esser et al. 2024), MMDiT, flow matching; gated, needs the download"""
    return load_flow_matching("stabilityai/stable-diffusion-3-medium-diffusers",
                              name="stabilityai/stable-diffusion-3-medium-diffusers")


def flux1_schnell() -> FlowMatchingModel:
    """FLUX.1 [schnell] (Black Forest Labs 2024), 12B flow transformer, few-step distilled; needs the download"""
    return load_flow_matching("black-forest-labs/FLUX.1-schnell", name="black-forest-labs/FLUX.1-schnell")


def flux1_dev() -> FlowMatchingModel:
    """FLUX.1 [dev] (Black Forest Labs 2024), 12B flow transformer, guidance-distilled; gated, needs the download"""
    return load_flow_matching("black-forest-labs/FLUX.1-dev", name="black-forest-labs/FLUX.1-dev")


PIPELINE_LOADERS = {  # model_index.json's _class_name -> loader
    "StableDiffusionPipeline": load_text_to_image,
    "LatentConsistencyModelPipeline": load_text_to_image,
    "StableDiffusionXLPipeline": load_sdxl,
    "StableDiffusion3Pipeline": load_flow_matching,
    "FluxPipeline": load_flow_matching,
}


def load_model(name: str) -> DiffusionModel:
    """A registered model by name, else a local folder or hub id through the loader of its pipeline class."""
    if name in MODELS:
        return MODELS.get(name)()
    if "/" in name or name.startswith(("~", ".")) or Path(name).exists():  # a folder or a hub id
        loader = PIPELINE_LOADERS.get(pipeline_class(resolve_folder(name)) or "", load_pixel_diffusion)
        return loader(name)
    raise BenchError(MODELS.unknown_message(name) + "; or pass a save_pretrained folder or a hub id (org/name)")


# issue 15: edm (Chen 2023's noise scheduling at 32x32; bench/recipes/noise_scheduling.py)
def embedded_ddpm32() -> DiffusionModel:
    """pixel DDPM of the 32x32 two-object world, the default linear schedule (Chen 2023's baseline; committed)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm32"), name="embedded-ddpm32", embedded=True)


def embedded_ddpm32_shifted() -> DiffusionModel:
    """the same, trained with Chen 2023's input scaling b = 0.5 (a trained_betas schedule; committed)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm32-shifted"), name="embedded-ddpm32-shifted",
                                embedded=True)


# issue 15: ldm -- pixel-space text-to-image (DeepFloyd IF's IFPipeline layout) and the latent budget model --------
PIXEL_T2I_KIND = "text-to-image-pixel"  # methods/text_to_image.py samples it without a VAE
PIPELINE_WEIGHTS["IFPipeline"] = ("unet", "text_encoder")


def load_pixel_text_to_image(source: str, name: str | None = None, embedded: bool = False) -> TextToImageModel:
    """An ``IFPipeline`` folder or hub id (DeepFloyd IF's layout: a text-conditioned UNet2DConditionModel on pixels,
    its text encoder and tokenizer, a DDPMScheduler; no VAE), loaded with ``from_pretrained`` in float32 (once per
    process while its files are unchanged; each call gets its own copy: bench.reuse). Kind "text-to-image-pixel":
    ``latent_shape`` is the pixels' shape and ``vae`` is None."""
    folder = resolve_folder(source)
    key = ("text-to-image-pixel", str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_pixel_text_to_image(folder, source, name, embedded))


def _load_pixel_text_to_image(folder: Path, source: str, name: str | None, embedded: bool) -> TextToImageModel:
    if pipeline_class(folder) != "IFPipeline":
        raise BenchError(f"{folder} is not an IFPipeline folder (model_index.json names {pipeline_class(folder)})")
    files = _pipeline_files(folder, "IFPipeline")
    from diffusers import IFPipeline  # lazy: see _load_text_to_image

    pipe = _from_pretrained(IFPipeline, folder, source, name)
    unet = pipe.unet
    if unet.config.out_channels not in (unet.config.in_channels, 2 * unet.config.in_channels):
        raise BenchError(f"{folder}/unet predicts {unet.config.out_channels} channels for {unet.config.in_channels} "
                         f"input channels (expected the noise, or the noise and IF's learned variance)")
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scheduler_config = _scheduler_config(pipe)
    return TextToImageModel(
        name=name or source,
        source=str(source),
        digest=file_digest(files, extra={"scheduler": scheduler_config}),
        kind=PIXEL_T2I_KIND,
        unet=unet,
        scheduler_config=scheduler_config,
        sample_shape=(unet.config.in_channels, h, w),
        embedded=embedded,
        vae=None,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        latent_shape=(unet.config.in_channels, h, w),
        pipeline=pipe,
    )


PIPELINE_LOADERS["IFPipeline"] = load_pixel_text_to_image


def embedded_pixel_t2i() -> TextToImageModel:
    """pixel-space text-to-image baseline of the shapes world (IFPipeline layout, 32x32 pixels, no VAE), trained at embedded-t2i-budget's FLOPs (Rombach et al. 2022's comparison)"""
    return load_pixel_text_to_image(str(EMBEDDED_WEIGHTS / "pixel-t2i"), name="embedded-pixel-t2i", embedded=True)


def embedded_t2i_budget() -> TextToImageModel:
    """embedded-t2i's latent recipe at a small training budget, the latent side of the equal-FLOPs comparison (committed)"""
    return load_text_to_image(str(EMBEDDED_WEIGHTS / "t2i-budget"), name="embedded-t2i-budget", embedded=True)


# issue 15: ldm -- critically-damped Langevin diffusion (no public diffusers format: a UNet2DModel folder + cld.json) --
CLD_KIND = "cld"


def load_cld(source: str, name: str | None = None, embedded: bool = False) -> DiffusionModel:
    """A CLD model folder (Dockhorn et al. 2022): ``unet/`` (a diffusers UNet2DModel on u = (x, v), 2C channels in,
    gDDIM's eps of both components out) and ``cld.json`` (the SDE's constants, bench/cld.py). No public diffusers
    format exists for CLD. ``scheduler_config`` holds the constants (hashed with the weights)."""
    folder = resolve_folder(source)
    key = ("cld", str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_cld(folder, source, name, embedded))


def _load_cld(folder: Path, source: str, name: str | None, embedded: bool) -> DiffusionModel:
    from bench.cld import CLD, CONFIG_FILE

    unet_dir = folder / "unet"
    config_file = folder / CONFIG_FILE
    if not (unet_dir / "config.json").exists() or not config_file.exists():
        raise BenchError(f"{folder} is not a CLD model folder (it needs unet/config.json and {CONFIG_FILE})")
    weights = [p for p in unet_dir.iterdir() if p.suffix == ".safetensors"]
    if not weights:
        raise BenchError(f"no safetensors weights in {unet_dir} (nothing is unpickled)")
    try:
        cld = CLD.from_dict(json.loads(config_file.read_text()))
    except (json.JSONDecodeError, ValueError, TypeError) as exc:
        raise BenchError(f"{config_file} is not a valid CLD config: {_first_line(exc)}") from None
    try:
        with quiet_loading():
            unet = UNet2DModel.from_pretrained(unet_dir, use_safetensors=True)
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {unet_dir}: {_first_line(exc)}") from None
    c_in, c_out = unet.config.in_channels, unet.config.out_channels
    if c_in % 2 or c_out != c_in:
        raise BenchError(f"{unet_dir}: a CLD UNet takes (x, v) and predicts eps of both: in_channels = out_channels "
                         f"= 2 x the image's channels, not {c_in} -> {c_out}")
    config = cld.to_dict()
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusionModel(
        name=name or source,
        source=str(source),
        digest=file_digest(weights + [config_file], extra={"unet": dict(unet.config), "cld": config}),
        kind=CLD_KIND,
        unet=unet.eval().requires_grad_(False),
        scheduler_config=config,
        sample_shape=(c_in // 2, h, w),
        embedded=embedded,
    )


def embedded_cld() -> DiffusionModel:
    """critically-damped Langevin diffusion of the shapes world (Dockhorn et al. 2022; 16x16, UNet on (x, v), hybrid score matching; committed)"""
    return load_cld(str(EMBEDDED_WEIGHTS / "cld"), name="embedded-cld", embedded=True)


# issue 18 (controlnet): ControlNets (Zhang et al. 2023), the spatial-condition branch a text-to-image adapter adds --
CONTROLNET_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
EMBEDDED_CONTROLNETS = {"embedded-controlnet-mask": "controlnet-mask"}  # name -> folder under EMBEDDED_WEIGHTS


def controlnet_folder(source: str) -> Path:
    """The folder of a ControlNet: an embedded name (its committed folder; missing: the command that trains it), a local
    ``save_pretrained`` folder, or a hub id through the Hugging Face cache (offline and missing: one line)."""
    if source in EMBEDDED_CONTROLNETS:
        folder = EMBEDDED_WEIGHTS / EMBEDDED_CONTROLNETS[source]
        if not (folder / CONTROLNET_FILES[1]).is_file():
            raise BenchError(f"the embedded ControlNet {source} is not in {folder}: train it with "
                             f"`bench embedded train {EMBEDDED_CONTROLNETS[source]}`")
        return folder
    return resolve_folder(source)


def load_controlnet(source: str):
    """A diffusers ``ControlNetModel`` from ``controlnet_folder(source)`` (safetensors only), frozen, and the digest of
    its files."""
    folder = controlnet_folder(source)
    missing = [f for f in CONTROLNET_FILES if not (folder / f).is_file()]
    if missing:
        raise BenchError(f"{folder} is not a ControlNetModel folder: it lacks {', '.join(missing)} (safetensors "
                         f"weights are required; nothing is unpickled)")
    from diffusers import ControlNetModel

    try:
        with quiet_loading():
            net = ControlNetModel.from_pretrained(folder, use_safetensors=True, dtype=torch.float32)
    except Exception as exc:
        raise BenchError(f"cannot load the ControlNet {source} from {folder}: {_first_line(exc)}") from None
    return net.eval().requires_grad_(False), file_digest([folder / f for f in CONTROLNET_FILES])


# issue 18 (ip2p): InstructPix2Pix (Brooks et al. 2023) -- a StableDiffusionInstructPix2PixPipeline folder ------------
INSTRUCT_PIX2PIX_KIND = "instruct-pix2pix"  # methods/instruct_pix2pix.py: the UNet also takes the source's latent


def load_instruct_pix2pix(source: str, name: str | None = None, embedded: bool = False) -> TextToImageModel:
    """A ``StableDiffusionInstructPix2PixPipeline`` folder or hub id (timbrooks/instruct-pix2pix's layout: SD-1.x's
    components, a UNet whose input is the noisy latent and the source image's latent, 8 channels), loaded with
    ``from_pretrained`` in float32 without the safety checker (once per process while its files are unchanged; each
    call gets its own copy: bench.reuse). Kind "instruct-pix2pix": ``latent_shape`` is the noisy latent's shape (the
    UNet's ``out_channels``), not the UNet's input."""
    folder = resolve_folder(source)
    key = (INSTRUCT_PIX2PIX_KIND, str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_instruct_pix2pix(folder, source, name, embedded))


def _load_instruct_pix2pix(folder: Path, source: str, name: str | None, embedded: bool) -> TextToImageModel:
    if pipeline_class(folder) != "StableDiffusionInstructPix2PixPipeline":
        raise BenchError(f"{folder} is not a StableDiffusionInstructPix2PixPipeline folder (model_index.json names "
                         f"{pipeline_class(folder)})")
    missing = [f for f in SD_WEIGHT_FILES if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder} lacks {', '.join(missing)} (safetensors weights are required; nothing is unpickled)")
    from diffusers import StableDiffusionInstructPix2PixPipeline  # lazy: see _load_text_to_image

    try:
        with _quiet_loading(), quiet_loading():
            pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False, dtype=torch.float32, use_safetensors=True)
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {folder}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    latent_channels = pipe.vae.config.latent_channels
    if pipe.unet.config.in_channels != 2 * latent_channels or pipe.unet.config.out_channels != latent_channels:
        raise BenchError(f"{folder}/unet takes {pipe.unet.config.in_channels} channels and predicts "
                         f"{pipe.unet.config.out_channels}; InstructPix2Pix's takes the noisy latent and the source's "
                         f"latent ({2 * latent_channels}) and predicts the noise ({latent_channels})")
    files = [folder / f for f in SD_WEIGHT_FILES + SD_TOKENIZER_FILES if (folder / f).exists()]
    fields = _latent_t2i_fields(pipe, files, source, name, embedded)
    fields["latent_shape"] = (latent_channels, *fields["latent_shape"][1:])
    return TextToImageModel(**fields, kind=INSTRUCT_PIX2PIX_KIND)


PIPELINE_LOADERS["StableDiffusionInstructPix2PixPipeline"] = load_instruct_pix2pix


def embedded_instruct_pix2pix() -> TextToImageModel:
    """embedded-t2i fine-tuned into an InstructPix2Pix editor (8-channel UNet: noisy latent + source latent; rendered instruction edits; committed)"""
    return load_instruct_pix2pix(str(EMBEDDED_WEIGHTS / "instruct-pix2pix"), name="embedded-instruct-pix2pix",
                                 embedded=True)


def instruct_pix2pix() -> TextToImageModel:
    """timbrooks/instruct-pix2pix (Brooks et al. 2023), 512x512 SD-1.5 fine-tune; needs the download"""
    return load_instruct_pix2pix("timbrooks/instruct-pix2pix", name="timbrooks/instruct-pix2pix")


# issue 18 (pbe): Paint-by-Example (Yang et al. 2023) -- a PaintByExamplePipeline folder ------------------------------

PAINT_BY_EXAMPLE_KIND = "paint-by-example"
PIPELINE_WEIGHTS["PaintByExamplePipeline"] = ("unet", "vae", "image_encoder")


@dataclasses.dataclass
class PaintByExampleModel(TextToImageModel):
    """A ``PaintByExamplePipeline``'s parts (kind "paint-by-example"): a 9-channel UNet (noisy latent, masked-image
    latent, mask) conditioned on ``image_encoder``'s exemplar embedding (a CLIP image tower, a mapper, a projection
    and the learned unconditional vector) instead of text; ``feature_extractor`` prepares the exemplar for it. No text
    encoder: ``text_encoder`` and ``tokenizer`` are None."""

    image_encoder: Any = None
    feature_extractor: Any = None

    def modules(self) -> list[Any]:
        return [self.unet, self.vae, self.image_encoder]


def load_paint_by_example(source: str, name: str | None = None, embedded: bool = False) -> PaintByExampleModel:
    """A ``PaintByExamplePipeline`` folder or hub id (Fantasy-Studio/Paint-by-Example's layout), loaded with
    ``from_pretrained`` in float32, safetensors only (once per process while its files are unchanged; each call gets
    its own copy: bench.reuse)."""
    folder = resolve_folder(source)
    key = (PAINT_BY_EXAMPLE_KIND, str(source), name, embedded, reuse.files_signature([folder]))
    return reuse.copied(key, lambda: _load_paint_by_example(folder, source, name, embedded))


class _PaintByExampleLoader:
    """A ``PaintByExamplePipeline`` built from its folder's components, each loaded by its own class (float32,
    safetensors only). diffusers 0.42 keeps the pipeline in ``pipelines/deprecated`` and can no longer resolve the
    image encoder's class from a ``model_index.json`` (``["diffusers", ...]`` as save_pretrained writes it, or
    Fantasy-Studio/Paint-by-Example's ``["paint_by_example", ...]``), not even when the encoder is passed in (its
    type check looks the class up the same way), so ``PaintByExamplePipeline.from_pretrained`` fails on every
    folder; and ``PaintByExampleImageEncoder`` takes its ``proj_size`` (default 768) from no config: it is the
    UNet's cross-attention width."""

    @staticmethod
    def from_pretrained(folder: Path, **kwargs: Any):
        import diffusers
        from diffusers import AutoencoderKL, PaintByExamplePipeline, UNet2DConditionModel
        from diffusers.pipelines.deprecated.paint_by_example.image_encoder import PaintByExampleImageEncoder
        from safetensors.torch import load_file
        from transformers import CLIPImageProcessor, CLIPVisionConfig

        folder = Path(folder)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", use_safetensors=True)
        vae = AutoencoderKL.from_pretrained(folder / "vae", use_safetensors=True)
        scheduler_cls = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
        scheduler = getattr(diffusers, scheduler_cls).from_pretrained(folder / "scheduler")
        enc_dir = folder / "image_encoder"
        encoder = PaintByExampleImageEncoder(CLIPVisionConfig.from_pretrained(enc_dir),
                                             proj_size=unet.config.cross_attention_dim)
        state: dict[str, torch.Tensor] = {}
        for f in sorted(enc_dir.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{enc_dir}: weights do not fit PaintByExampleImageEncoder (missing "
                             f"{', '.join(missing[:3]) or 'none'}; unexpected {', '.join(unexpected[:3]) or 'none'})")
        return PaintByExamplePipeline(vae=vae, image_encoder=encoder.eval(), unet=unet, scheduler=scheduler,
                                      safety_checker=None,
                                      feature_extractor=CLIPImageProcessor.from_pretrained(folder / "feature_extractor"),
                                      requires_safety_checker=False)


def _load_paint_by_example(folder: Path, source: str, name: str | None, embedded: bool) -> PaintByExampleModel:
    if pipeline_class(folder) != "PaintByExamplePipeline":
        raise BenchError(f"{folder} is not a PaintByExamplePipeline folder (model_index.json names "
                         f"{pipeline_class(folder)})")
    files = _pipeline_files(folder, "PaintByExamplePipeline")
    files += [p for p in sorted((folder / "feature_extractor").glob("*.json"))]
    pipe = _from_pretrained(_PaintByExampleLoader, folder, source, name)
    if pipe.feature_extractor is None:
        raise BenchError(f"{folder} has no feature_extractor (the exemplar's CLIPImageProcessor)")
    if pipe.unet.config.in_channels != 2 * pipe.vae.config.latent_channels + 1:
        raise BenchError(f"{folder}/unet takes {pipe.unet.config.in_channels} input channels; Paint-by-Example's takes "
                         f"{2 * pipe.vae.config.latent_channels + 1} (latent, masked-image latent, mask)")
    scheduler_config = _scheduler_config(pipe)
    latent = pipe.unet.config.sample_size
    h, w = (latent, latent) if isinstance(latent, int) else tuple(latent)
    factor = pipe.vae_scale_factor
    return PaintByExampleModel(
        name=name or source,
        source=str(source),
        digest=file_digest(files, extra={"scheduler": scheduler_config,
                                         "vae_scaling_factor": pipe.vae.config.scaling_factor}),
        kind=PAINT_BY_EXAMPLE_KIND,
        unet=pipe.unet,
        scheduler_config=scheduler_config,
        sample_shape=(3, h * factor, w * factor),
        embedded=embedded,
        vae=pipe.vae,
        latent_shape=(pipe.vae.config.latent_channels, h, w),
        pipeline=pipe,
        image_encoder=pipe.image_encoder,
        feature_extractor=pipe.feature_extractor,
    )


PIPELINE_LOADERS["PaintByExamplePipeline"] = load_paint_by_example


def embedded_paint_by_example() -> PaintByExampleModel:
    """Paint-by-Example of the shapes world: embedded-t2i's UNet widened to 9 channels, the evaluation CLIP's image tower (committed)"""
    return load_paint_by_example(str(EMBEDDED_WEIGHTS / "paint-by-example"), name="embedded-paint-by-example",
                                 embedded=True)


def paint_by_example_public() -> PaintByExampleModel:
    """Fantasy-Studio/Paint-by-Example: the paper's released checkpoint (SD-1.4 based, 512x512; needs the download)"""
    return load_paint_by_example("Fantasy-Studio/Paint-by-Example", name="Fantasy-Studio/Paint-by-Example")
