"""HyperDreamBooth: Ruiz et al., "HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models"
(arXiv 2307.06949, CVPR 2024).

Per subject, from ONE of its images (``--reference-image``):

1. The HyperNetwork (trained once across many subjects by ``bench embedded train hyperdreambooth``; see
   bench/embedded/hyperdreambooth.py and bench/recipes/hyperdreambooth.py) predicts the subject's Lightweight
   DreamBooth weights (Sec. 3.1-3.2): a rank-1 LoRA of every attention projection whose factors live in frozen
   random orthogonal bases, ``delta W = B_aux B_train A_train A_aux``. Multiplied out, that is an ordinary rank-1
   LoRA ``(B_h, A_h)``.
2. Rank-relaxed fast fine-tuning (Sec. 3.3): the prediction is added to the UNet's weights and a new LoRA of a
   higher rank (``--rank``, B zero so training starts at the prediction) is trained for ``--train-steps`` (40, the
   paper's) on that one image with DreamBooth's caption ("a large sks <class noun> on a <background> background"),
   through methods/lora.py's peft ``LoraConfig`` and the shared personalization loop.
3. Saved as one diffusers LoRA of rank ``1 + rank``: ``lora_A = [A_relaxed; A_h]``, ``lora_B = [(alpha / rank)
   B_relaxed, B_h]`` (alpha = rank + 1 in the metadata, so the scale is 1), which is exactly ``B_h A_h + (alpha /
   rank) B_relaxed A_relaxed``; generation loads it back with ``load_lora_weights`` as methods/lora.py does.

The budget columns (``train_steps``, ``train_seconds``, ...) are the per-subject test-time cost: the prediction and
the fast fine-tune. The HyperNetwork's one-time pre-training is recorded beside them from its RECIPE.json
(``pretrain_seconds``, ``pretrain_steps``). There is no public HyperDreamBooth HyperNetwork for Stable Diffusion:
on any model but the one the committed HyperNetwork was trained for, the run is refused in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
from peft import LoraConfig

from bench.claim import Claim, personalize
from bench.embedded.hyperdreambooth import LoadedHyperNetwork, hypernetwork_folder, load_hypernetwork
from bench.errors import BenchError
from bench.interfaces import DiffusionModel, MethodCard
from bench.personalization import PersonalizationSet, Subject
from bench.validate import check_option
from methods.lora import LORA_FILE, TARGET_MODULES, LoRA, LoRAArgs, load  # noqa: F401 (load: the LoRA loader)


@dataclass(frozen=True)
class HyperDreamBoothArgs(LoRAArgs):
    train_steps: int = field(default=40, metadata={"help": "rank-relaxed fast fine-tuning steps per subject (the "
                                                           "paper's 40; 0: the HyperNetwork's prediction alone)"})
    learning_rate: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the relaxed LoRA (constant)"})
    rank: int = field(default=4, metadata={"help": "the relaxed rank of the fast fine-tune's LoRA"})
    alpha: float = field(default=4.0, metadata={"help": "its lora_alpha (the update is scaled by alpha / rank)"})
    reference_image: int = field(default=0, metadata={"help": "which image of each subject is the single input"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("reference_image", self.reference_image, 0, integer=True)


class HyperDreamBooth(LoRA):
    name = "hyperdreambooth"
    summary = "HyperDreamBooth: a HyperNetwork predicts LiDB weights from one image, then rank-relaxed fast fine-tuning"
    paper = "Ruiz et al. 2024, HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models"
    saves = f"<subject>/{LORA_FILE} (diffusers' LoRA format: the prediction and the relaxed LoRA, rank + 1)"
    card = MethodCard(
        citation="Nataniel Ruiz, Yuanzhen Li, Varun Jampani, Wei Wei, Tingbo Hou, Yael Pritch, Neal Wadhwa, Michael "
        "Rubinstein, Kfir Aberman. HyperDreamBooth: HyperNetworks for Fast Personalization of Text-to-Image Models. "
        "CVPR 2024; arXiv 2307.06949.",
        url="https://arxiv.org/abs/2307.06949",
        reproduces="Sec. 3.1 LiDB (rank-1 LoRA in frozen random orthogonal bases A_aux, B_aux), Sec. 3.2 the "
        "HyperNetwork (image encoder + transformer decoder, iterative weight refinement, trained on many subjects with "
        "the denoising loss plus the weight-space loss to pre-optimized LiDB weights), Sec. 3.3 rank-relaxed fast "
        "fine-tuning on the one input image (40 steps). Embedded scale: a = 32, b = 16 (the paper's 100 and 50 do not "
        "fit 64-96 wide layers); the encoder is the frozen trunk of the shapes-cnn32 feature network (the paper's "
        "ViT-H); a 2-layer decoder of width 64 applied for 4 iterations; 54 rendered training subjects (seen shapes x "
        "seen colors x seen class nouns; the held-out diamond and orange never seen); the fine-tune's learning rate "
        "5e-3 and relaxed rank 4 are this project's (the paper's: verify). Recipe: bench embedded train "
        "hyperdreambooth.",
        reference="Faces, SD 1.5 (verify): personalization in about 20 s, 25x faster than DreamBooth and 125x faster "
        "than Textual Inversion, from one image, at DreamBooth's quality (Table 1: face recognition, DINO, CLIP-I, "
        "CLIP-T); LiDB: 30K trainable variables, 120 KB, 10,000x smaller than a DreamBooth model; the HyperNetwork "
        "trained on 15K CelebA-HQ identities; loss weights alpha = 1, beta = 0.01.",
        embedded_claim="From one image and 40 fine-tune steps, CLIP-I within a stated margin of LoRA's (400 steps, all "
        "5 images), at a fraction of LoRA's per-subject training steps; the HyperNetwork's prediction alone (0 steps) "
        "above the untuned model. Decided by `bench claims --method hyperdreambooth`.",
    )
    Args: ClassVar[type] = HyperDreamBoothArgs
    model_kinds = ("text-to-image",)  # not LoRA's SDXL: the HyperNetwork predicts weights for the embedded SD layout
    claims = (
        Claim("one-image-near-lora", "from one image and 40 fast fine-tuning steps the subject fidelity is comparable "
              "to a LoRA trained for 400 steps on all of the subject's images: CLIP-I at least LoRA's minus 20%",
              "Table 1 (verify): HyperDreamBooth from one image at DreamBooth's fidelity", "clip_i",
              (("hyperdreambooth", personalize("hyperdreambooth", quick_options={"train_steps": 4})),
               ("lora", personalize("lora"))), "at-least", tolerance="margin", margin=0.2, relative=True,
              note="--quick: 4 fine-tune steps against LoRA's 40, the same 1:10 ratio"),
        Claim("fraction-of-the-time", "a fraction of LoRA's per-subject training cost: at most a fifth of its "
              "training seconds (the prediction and the fast fine-tune; the one-time pre-training is pretrain_seconds)",
              "abstract (verify): personalization in about 20 s, 25x faster than DreamBooth", "train_seconds",
              (("hyperdreambooth", personalize("hyperdreambooth", quick_options={"train_steps": 4})),
               ("lora", personalize("lora"))), "less", tolerance="margin", margin=0.8, relative=True),
        Claim("hypernetwork-alone-learns", "the HyperNetwork's prediction alone (no fine-tuning) moves the model "
              "towards the subject: CLIP-I above the untuned model's", "Fig. 7 (verify): the HyperNetwork's prediction "
              "resembles the subject before fast fine-tuning", "clip_i",
              (("prediction only", personalize("hyperdreambooth", train_steps=0)),
               ("untuned", personalize("textual-inversion", train_steps=0))), "greater", tolerance="margin",
              note="the held-out shape and color were never in the HyperNetwork's training subjects"),
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self._hyper: LoadedHyperNetwork | None = None
        self.merged: dict[str, torch.Tensor] = {}  # layer -> W0, while W0 + B_h A_h is in the UNet
        self.predicted: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    # -- the HyperNetwork ----------------------------------------------------------------------------------------------
    def hyper(self) -> LoadedHyperNetwork:
        if self._hyper is None:
            self._hyper = load_hypernetwork()
        return self._hyper

    def check(self, model: DiffusionModel, steps: int) -> None:
        super().check(model, steps)
        base = self.hyper().meta.get("base_model", {})
        if base.get("digest") != getattr(model, "digest", None):
            raise BenchError(f"there is no public HyperDreamBooth hypernetwork for {model.name}; the committed one "
                             f"(bench embedded train hyperdreambooth) is trained for {base.get('name', '?')} only")
        if self.args.identifier != self.hyper().meta.get("identifier"):
            raise BenchError(f"--identifier {self.args.identifier!r}: the hypernetwork was trained with "
                             f"{self.hyper().meta.get('identifier')!r}")

    def check_dataset(self, reference: Any) -> None:
        super().check_dataset(reference)
        assert isinstance(reference, PersonalizationSet)
        for s in reference.subjects():
            if self.args.reference_image >= len(s.images):
                raise BenchError(f"--reference-image {self.args.reference_image}: subject {s.name} has "
                                 f"{len(s.images)} images (0 to {len(s.images) - 1})")
            if tuple(s.images.shape[1:3]) != (32, 32):
                raise BenchError(f"the embedded hypernetwork reads 32x32 images; subject {s.name} of {reference.name} "
                                 f"is {s.images.shape[2]}x{s.images.shape[1]}")

    def protocol(self, model: DiffusionModel) -> dict[str, Any]:
        return {**super().protocol(model), "hypernetwork": {"digest": self.hyper().digest,
                                                             "recipe": "bench embedded train hyperdreambooth"}}

    # -- one image, the prediction, the relaxed LoRA -------------------------------------------------------------------
    def training_data(self, model, reference, subject: Subject, spec):
        i = self.args.reference_image
        one = subject.select(slice(i, i + 1))
        return super().training_data(model, reference, one, spec)

    def trainable(self, model: DiffusionModel, subject: Subject) -> list[torch.nn.Parameter]:
        hyper = self.hyper()
        image = subject.images_tensor()[self.args.reference_image : self.args.reference_image + 1]
        factors = hyper.basis.lora_factors(hyper.predict(image)[0])
        self.predicted[subject.name] = factors
        with torch.no_grad():  # W0 + B_h A_h: the relaxed LoRA trains on top of the prediction
            for layer, (a, b) in factors.items():
                weight = model.unet.get_submodule(layer).weight
                self.merged[layer] = weight.detach().clone()
                weight.add_((b @ a).to(weight))
        return super().trainable(model, subject)

    def lora_state(self, model: DiffusionModel, subject: Subject) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        state, config = super().lora_state(model, subject)
        with torch.no_grad():  # the UNet back to W0, exactly, before the adapter is deleted
            for layer, original in self.merged.items():
                model.unet.get_submodule(layer).weight.copy_(original)  # peft's layer: its base layer's weight
        self.merged = {}
        scale = self.args.alpha / self.args.rank
        for layer, (a, b) in self.predicted[subject.name].items():
            down, up = f"{layer}.lora.down.weight", f"{layer}.lora.up.weight"
            state[down] = torch.cat([state[down], a.to(state[down])])
            state[up] = torch.cat([scale * state[up], b.to(state[up])], dim=1)
        rank = self.args.rank + a.shape[0]
        merged = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGET_MODULES))
        return state, merged.to_dict()

    def after_training(self, model: DiffusionModel, subjects: Sequence[Subject], workdir: Path) -> dict[str, float]:
        """The HyperNetwork's one-time pre-training budget (its RECIPE.json), beside the per-subject cost."""
        try:
            budget = json.loads((hypernetwork_folder() / "RECIPE.json").read_text())["budget"]
        except (OSError, ValueError, KeyError):
            return {}
        lidb = self.hyper().basis
        return {"pretrain_seconds": float(budget["pretrain_seconds"]),
                "pretrain_steps": float(budget["pretrain_steps"]),
                "pretrain_peak_memory_bytes": float(budget["peak_memory_bytes"]),
                "pretrain_lidb_weights": float(len(lidb.layers) * lidb.config.per_layer)}
