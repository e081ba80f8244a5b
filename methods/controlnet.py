"""ControlNet: Zhang, Rao, Agrawala, "Adding Conditional Control to Text-to-Image Diffusion Models", ICCV 2023.

A trainable copy of the text-to-image UNet's encoder (down blocks and middle block) reads the noisy latent, the
timestep, the prompt and a spatial condition (through a small conditioning embedding to the latent's resolution);
its outputs go through zero convolutions and are added to the frozen UNet's skip connections and middle block
(``down_block_additional_residuals``, ``mid_block_additional_residual``), times the conditioning scale. At step 0 the
zero convolutions make every residual zero: the base model's output, exactly.

Here the ControlNet is diffusers' ``ControlNetModel`` (the format of lllyasviel's checkpoints) and the loop is the
text-to-image adapters' own (methods/text_to_image.py: the pipeline's encode_prompt, CFG in one batch, DDIM or PNDM),
the ControlNet called before every UNet call on the same scaled latent and embeddings, the condition repeated over
the CFG branches as ``StableDiffusionControlNetPipeline`` does (not guess mode): with the same latents its images
are the pipeline's (tests/test_controlnet.py). The condition comes from each item's ``control`` (embedded-controls:
the object mask) or one ``--control-image`` for every item.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from bench.claim import Arm, Claim
from bench.errors import BenchError
from bench.files import file_digest
from bench.interfaces import Batch, DiffusionModel, EditItem, MethodCard
from bench.models import CONTROLNET_FILES, EMBEDDED_CONTROLNETS, controlnet_folder, load_controlnet
from bench.validate import check_option
from methods.text_to_image import GuidanceArgs, LatentTextToImage

INIT = "init"  # --controlnet init: ControlNetModel.from_unet of the run's UNet, untrained (zero convolutions)
DEFAULT_CONTROLNET = "embedded-controlnet-mask"
PUBLIC_CONTROLNETS = ("lllyasviel/sd-controlnet-seg", "lllyasviel/sd-controlnet-canny")  # SD-1.5's, same code path
SD_CONDITIONING_CHANNELS = (16, 32, 96, 256)  # diffusers' default: 3 stride-2 convolutions, SD's VAE factor 8
INIT_SEED = 0  # the conditioning embedding's inner convolutions (random; their output meets a zero convolution)
TRAIN_COMMAND = "bench embedded train controlnet-mask"


def conditioning_channels(vae_factor: int) -> tuple[int, ...]:
    """The conditioning embedding's channels for a VAE that downsamples by ``vae_factor``: SD's (16, 32, 96, 256),
    cut to log2(factor) stride-2 convolutions (embedded-t2i's factor 4: (16, 32, 96), 32x32 -> 8x8)."""
    k = int(vae_factor).bit_length() - 1
    if vae_factor < 2 or 2**k != vae_factor or k >= len(SD_CONDITIONING_CHANNELS):
        raise BenchError(f"a VAE factor of {vae_factor} has no ControlNet conditioning embedding here (2, 4 or 8)")
    return SD_CONDITIONING_CHANNELS[: k + 1]


def init_controlnet(unet: Any, vae_factor: int):
    """``ControlNetModel.from_unet``: the encoder copied from ``unet``, zero convolutions, the conditioning embedding
    reaching the latent's resolution (its inner convolutions seeded)."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=conditioning_channels(vae_factor))


def read_image(path: str) -> np.ndarray:
    """A control image file as uint8 [H, W, C] (its own channels: nothing converted); one line if it is not one."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise BenchError(f"--control-image {path}: no such file")
    try:
        with Image.open(p) as im:
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise BenchError(f"--control-image {path} is not an image ({type(exc).__name__})") from None
    return arr[..., None] if arr.ndim == 2 else arr


def check_control(control: Any, shape: tuple[int, int], what: str) -> None:
    """One line unless ``control`` is a uint8 RGB image [H, W, 3] of the run's image size."""
    if control is None:
        raise BenchError(f"{what} has no control image: ControlNet needs one per item (embedded-controls has them, "
                         f"or give --control-image PATH)")
    arr = np.asarray(control)
    channels = arr.shape[2] if arr.ndim == 3 else 1
    if arr.ndim not in (2, 3) or channels != 3 or arr.shape[:2] != tuple(shape):
        raise BenchError(f"{what}: the control image is {arr.shape[1] if arr.ndim > 1 else '?'}x{arr.shape[0]} with "
                         f"{channels} channel(s); ControlNet on this model takes {shape[1]}x{shape[0]} RGB (3 channels)")
    if arr.dtype != np.uint8:
        raise BenchError(f"{what}: the control image is {arr.dtype}, not uint8")


@dataclass(frozen=True)
class ControlNetArgs(GuidanceArgs):
    controlnet: str = field(default=DEFAULT_CONTROLNET, metadata={
        "help": f"the ControlNet: {DEFAULT_CONTROLNET} (trained by `{TRAIN_COMMAND}`), {INIT} (from_unet, untrained: "
                f"zero convolutions), a hub id ({', '.join(PUBLIC_CONTROLNETS)}) or a ControlNetModel folder"})
    conditioning_scale: float = field(default=1.0, metadata={
        "help": "the residuals' scale (diffusers' controlnet_conditioning_scale; 0: the base model, no ControlNet call)"})
    control_image: str = field(default="", metadata={
        "help": "one control image file for every item (default: each item's own, e.g. embedded-controls' masks)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("conditioning_scale", self.conditioning_scale, 0)
        if not isinstance(self.controlnet, str) or not self.controlnet.strip():
            raise ValueError(f"--controlnet must name a ControlNet, got {self.controlnet!r}")


def arm(steps: int = 50, **options: Any) -> Arm:
    """ControlNet on embedded-controls with embedded-t2i: 256 held-out conditions, one seed, 50 DDIM steps (--quick:
    128, FID's least, 10 steps)."""
    return Arm("controlnet", steps, dict(options), model="embedded-t2i", dataset="embedded-controls", num_samples=256,
               seeds=(0,), quick_num_samples=128, quick_seeds=(0,), quick_steps=10, metrics=CLAIM_METRICS)


CLAIM_METRICS = ("control-iou", "fid", "clip-score", "edit-ground-truth")


class ControlNet(LatentTextToImage):
    name = "controlnet"
    summary = "ControlNet: a trainable encoder copy with zero convolutions adds a spatial condition to a frozen text-to-image UNet"
    paper = "Zhang et al. 2023, Adding Conditional Control to Text-to-Image Diffusion Models"
    card = MethodCard(
        citation="Lvmin Zhang, Anyi Rao, Maneesh Agrawala. Adding Conditional Control to Text-to-Image Diffusion "
        "Models. ICCV 2023; arXiv 2302.05543.",
        url="https://arxiv.org/abs/2302.05543",
        reproduces="Sec. 3: a trainable copy of the UNet's encoder and middle block (ControlNetModel.from_unet), the "
        "condition through a small conditioning embedding, zero convolutions on every output, added to the frozen "
        "UNet's skip connections and middle block times the conditioning scale; trained with the denoising loss, 50% "
        "of the prompts replaced by the empty one (Sec. 3.3), the base UNet, VAE and text encoder frozen. Sampling as "
        "StableDiffusionControlNetPipeline (not guess mode), guidance 7.5: equal to its output with the same latents "
        "(tests/test_controlnet.py). Embedded: the condition is the object mask (white on black, the segmentation "
        "layout with one class) of the shapes world; the conditioning embedding has two stride-2 convolutions "
        "(16, 32, 96 channels) because the embedded VAE's factor is 4, not SD's 8; trained on the t2i model's own "
        "training scenes (seed 6) for a few minutes on 2 CPU cores (bench/recipes/controlnet.py; the paper: 50k-3M "
        "images, AdamW lr 1e-5, days of A100). Public lllyasviel ControlNets (SD-1.5) load through the same code. "
        "ControlNet evaluations are not counted in the NFE (the UNet's are).",
        reference="Sec. 4.3 (verify): on ADE20K segmentation conditions, the IoU of the generated images' "
        "re-segmentation (OneFormer) 0.35 for ControlNet, above the other conditioning methods compared; FID 15.27, "
        "CLIP score 0.26 for ControlNet in the quality comparison; zero convolutions leave the model unchanged at "
        "step 0 (Sec. 3.1).",
        embedded_claim="On embedded-controls (held-out scenes): the object mask's IoU with the generated objects is far "
        "above the base model's on the same captions and seeds; FID (shapes-cnn32) and CLIP score (shapes-clip) within "
        "declared margins of the base's; an untrained ControlNet (zero convolutions) gives the base model's images "
        "exactly. Decided by `bench claims --method controlnet` (verdicts and values: its latest MLflow claims run, "
        "`bench report`).",
    )
    Args: ClassVar[type] = ControlNetArgs
    model_kinds: ClassVar[tuple[str, ...]] = ("text-to-image",)
    conditioning: ClassVar[str] = "edit"  # each sample gets an item: its caption and its control image
    default_dataset: ClassVar[str | None] = "embedded-controls"
    claims = (
        Claim("follows-the-condition", "the generated objects follow the spatial condition: the IoU between the "
              "condition's mask and the generated objects' mask far above the base model's on the same captions "
              "and seeds (at least 0.2 higher, a margin declared before measuring)",
              "Sec. 4.3 (verify): ADE20K, IoU of the generated images' re-segmentation 0.35 for ControlNet, above "
              "the other conditioning methods compared", "control_iou_border_seg",
              (("controlnet", arm()), ("base model (scale 0)", arm(conditioning_scale=0.0))), "greater",
              tolerance="margin", margin=0.2),
        Claim("keeps-image-quality", "image quality is kept: FID (shapes-cnn32, against the held-out renders) not "
              "above the base model's by more than a quarter of it (a margin declared before measuring)",
              "Sec. 4.3 (verify): FID 15.27 for ControlNet on segmentation-conditioned images, the best of the "
              "conditioning methods compared", "fid", (("controlnet", arm()), ("base model (scale 0)", arm(conditioning_scale=0.0))),
              "at-most", tolerance="margin", margin=0.25, relative=True),
        Claim("keeps-text-alignment", "text alignment is kept: CLIP score (shapes-clip) not below the base model's by "
              "more than 5% of it (a margin declared before measuring)",
              "Sec. 4.3 (verify): CLIP score 0.26 for ControlNet, on a par with the methods compared", "clip_score",
              (("controlnet", arm()), ("base model (scale 0)", arm(conditioning_scale=0.0))), "at-least",
              tolerance="margin", margin=0.05, relative=True),
        Claim("zero-convolutions-keep-the-base", "zero convolutions do not disturb the base at step 0: an untrained "
              "ControlNet (from_unet, zero convolutions) gives the base model's images, the same PSNR to the ground "
              "truth to the last digit (margin 0; tests/test_controlnet.py asserts the images are equal)",
              "Sec. 3.1: 'no harmful noise could affect the deep features ... the model is unchanged at the start of "
              "training'", "gt_psnr",
              (("untrained controlnet", arm(controlnet=INIT)), ("base model (scale 0)", arm(conditioning_scale=0.0))),
              "within", tolerance="margin", margin=0.0),
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self._net: Any = None
        self._net_key: Any = None
        self._shape: tuple[int, int] = (0, 0)

    # -- the ControlNet ------------------------------------------------------------------------------------------------
    def uses_controlnet(self) -> bool:
        return float(self.args.conditioning_scale) != 0.0

    @staticmethod
    def vae_factor(model: DiffusionModel) -> int:
        return model.sample_shape[1] // model.latent_shape[1]

    def controlnet(self, model: DiffusionModel):
        """The ControlNet for ``model`` (loaded or built once; checked against the UNet), frozen."""
        key = (id(model.unet), self.args.controlnet)
        if self._net is None or self._net_key != key:
            if self.args.controlnet == INIT:
                net = init_controlnet(model.unet, self.vae_factor(model)).eval().requires_grad_(False)
            else:
                net, _ = load_controlnet(self.args.controlnet)
                self.check_pair(net, model)
            param = next(model.unet.parameters())
            self._net, self._net_key = net.to(param.device, param.dtype), key
        return self._net

    def check_pair(self, net: Any, model: DiffusionModel) -> None:
        cfg, ucfg = net.config, model.unet.config
        factor = 2 ** (len(cfg.conditioning_embedding_out_channels) - 1)
        if (tuple(cfg.block_out_channels) != tuple(ucfg.block_out_channels)
                or cfg.cross_attention_dim != ucfg.cross_attention_dim or factor != self.vae_factor(model)):
            raise BenchError(f"ControlNet {self.args.controlnet} (blocks {list(cfg.block_out_channels)}, text width "
                             f"{cfg.cross_attention_dim}, condition /{factor}) does not fit {model.name} (blocks "
                             f"{list(ucfg.block_out_channels)}, text width {ucfg.cross_attention_dim}, latents /"
                             f"{self.vae_factor(model)})")
        if self.args.controlnet in EMBEDDED_CONTROLNETS:
            recipe = controlnet_folder(self.args.controlnet) / "RECIPE.json"
            base = json.loads(recipe.read_text()).get("base_model_digest") if recipe.is_file() else None
            if base is not None and base != model.digest:
                raise BenchError(f"the embedded ControlNet {self.args.controlnet} was trained on another model than "
                                 f"{model.name}; retrain it with `{TRAIN_COMMAND}`")

    def image_shape(self, model: DiffusionModel) -> tuple[int, int]:
        return model.sample_shape[1], model.sample_shape[2]

    # -- checks and protocol -------------------------------------------------------------------------------------------
    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        self._shape = self.image_shape(model)
        if model.vae is None or self.guidance_input_dim(model) is not None:
            raise BenchError(f"method {self.name!r} runs on Stable Diffusion 1.x-layout models (a VAE, CFG in two "
                             f"branches); {model.name} is not one")
        if self.args.control_image:
            check_control(read_image(self.args.control_image), self.image_shape(model),
                          f"--control-image {self.args.control_image}")
        if self.uses_controlnet():
            self.controlnet(model)  # loads (one line if missing) and checks it fits, before any run exists

    def check_items(self, items: Sequence[EditItem]) -> None:
        """Every item's control image (unless --control-image replaces them), before the run exists."""
        if not self.args.control_image:
            for it in items:
                check_control(it.control, self._shape, f"item {it.key}")

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        out = super().protocol(model)
        if not self.uses_controlnet():
            out["controlnet"] = None  # the base model: no ControlNet call
        elif self.args.controlnet == INIT:
            out["controlnet"] = {"init": "ControlNetModel.from_unet", "seed": INIT_SEED,
                                 "conditioning_embedding_out_channels": list(conditioning_channels(self.vae_factor(model)))}
        else:
            folder = controlnet_folder(self.args.controlnet)
            out["controlnet"] = file_digest([folder / f for f in CONTROLNET_FILES])
        if self.args.control_image:
            out["control_image"] = file_digest([Path(self.args.control_image).expanduser()])
        return out

    # -- sampling ------------------------------------------------------------------------------------------------------
    def control_batch(self, items: Sequence[EditItem]) -> torch.Tensor:
        """The conditions of a batch as float [N, 3, H, W] in [0, 1] (the pipeline's control image processor: no
        normalization)."""
        if self.args.control_image:
            one = read_image(self.args.control_image)
            arrays = [one] * len(items)
        else:
            arrays = [np.asarray(it.control) for it in items]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        if len(batch.edits) != len(batch):
            raise ValueError(f"{len(batch.edits)} items for {len(batch)} seeds")
        batch = dataclasses.replace(batch, prompts=tuple(it.target_prompt for it in batch.edits))
        if not self.uses_controlnet():
            return super().generate(model, batch, denoiser)  # the base model, exactly
        for it in ([] if self.args.control_image else batch.edits):
            check_control(it.control, self.image_shape(model), f"item {it.key}")
        net = self.controlnet(model)
        param = next(model.unet.parameters())
        control = self.control_batch(batch.edits).to(param.device, param.dtype)
        scale = float(self.args.conditioning_scale)

        def controlled(x_in: torch.Tensor, t, **context) -> torch.Tensor:
            cond = control.repeat(x_in.shape[0] // len(control), 1, 1, 1)  # [c; c] under CFG's [uncond; cond]
            down, mid = net(x_in, t, encoder_hidden_states=context["encoder_hidden_states"], controlnet_cond=cond,
                            conditioning_scale=scale, guess_mode=False, return_dict=False)
            return denoiser(x_in, t, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                            **context)

        return super().generate(model, batch, controlled)
