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
import json
import os
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils import logging as diffusers_logging
from huggingface_hub import snapshot_download

from bench import reuse
from bench.catalog import MODELS
from bench.errors import BenchError
from bench.files import file_digest
from bench.interfaces import DiffusionModel, TextToImageModel

EMBEDDED_WEIGHTS = Path(__file__).resolve().parent / "embedded" / "weights"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


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
        raise BenchError(f"model folder {source} does not exist")

    try:
        return Path(
            snapshot_download(
                source,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "**/*.json", "**/*.safetensors", "**/*.txt"],
            )
        )
    except Exception:  # offline, unknown repo, gated: all mean the files are not here
        raise BenchError(
            f"model {source} is not in the local Hugging Face cache and cannot be downloaded here: "
            f"run `hf download {source}` on a machine with network access (HF_HOME={_hf_home()}), "
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
        scheduler = DDPMScheduler.from_config(sched_config)
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {unet_dir}: {_first_line(exc)}") from None
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return DiffusionModel(
        name=name or source,
        source=str(source),
        digest=file_digest(weights, extra={"unet": dict(unet.config), "scheduler": config}),
        kind="pixel-diffusion",
        unet=unet.eval().requires_grad_(False),
        scheduler_config=config,
        sample_shape=(unet.config.out_channels, h, w),
        embedded=embedded,
    )


def embedded_pixel_ddpm() -> DiffusionModel:
    """pixel DDPM of the shapes world (16x16, UNet2DModel 1.1M params, committed safetensors)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm"), name="embedded-ddpm", embedded=True)


def embedded_pixel_ddpm_zsnr() -> DiffusionModel:
    """the same pixel DDPM trained with zero-terminal-SNR betas and v-prediction (Lin et al. 2023)"""
    return load_pixel_diffusion(str(EMBEDDED_WEIGHTS / "pixel-ddpm-zsnr"), name="embedded-ddpm-zsnr", embedded=True)


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


def _load_text_to_image(folder: Path, source: str, name: str | None, embedded: bool) -> TextToImageModel:
    if pipeline_class(folder) != "StableDiffusionPipeline":
        raise BenchError(f"{folder} is not a StableDiffusionPipeline folder (model_index.json names "
                         f"{pipeline_class(folder)})")
    missing = [f for f in SD_WEIGHT_FILES if not (folder / f).exists()]
    if missing:
        raise BenchError(f"{folder} lacks {', '.join(missing)} (safetensors weights are required; nothing is unpickled)")
    # imported here: the pipeline pulls in transformers and diffusers' loaders (seconds), which runs of pixel models
    # (and every Ray or Slurm worker that makes them) do not need
    from diffusers import StableDiffusionPipeline

    try:
        with _quiet_loading():
            pipe = StableDiffusionPipeline.from_pretrained(
                folder, safety_checker=None, requires_safety_checker=False, dtype=torch.float32, use_safetensors=True
            )
    except Exception as exc:
        raise BenchError(f"cannot load model {name or source} from {folder}: {_first_line(exc)}") from None
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    scheduler_config["_class_name"] = type(pipe.scheduler).__name__
    files = [folder / f for f in SD_WEIGHT_FILES + SD_TOKENIZER_FILES if (folder / f).exists()]
    latent = pipe.unet.config.sample_size
    latent_hw = (latent, latent) if isinstance(latent, int) else tuple(latent)
    factor = pipe.vae_scale_factor
    return TextToImageModel(
        name=name or source,
        source=str(source),
        digest=file_digest(files, extra={"scheduler": scheduler_config, "vae_scaling_factor": pipe.vae.config.scaling_factor}),
        kind="text-to-image",
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


def stable_diffusion_v1_5() -> TextToImageModel:
    """Stable Diffusion v1.5 (Rombach et al. 2022), 512x512; needs the download"""
    return load_text_to_image("stable-diffusion-v1-5/stable-diffusion-v1-5", name="stable-diffusion-v1-5/stable-diffusion-v1-5")


def load_model(name: str) -> DiffusionModel:
    """A registered model by name, else a local folder or hub id through the generic loader."""
    if name in MODELS:
        return MODELS.get(name)()
    if "/" in name or name.startswith(("~", ".")) or Path(name).exists():  # a folder or a hub id
        if pipeline_class(resolve_folder(name)) == "StableDiffusionPipeline":
            return load_text_to_image(name)
        return load_pixel_diffusion(name)
    raise BenchError(MODELS.unknown_message(name) + "; or pass a save_pretrained folder or a hub id (org/name)")
