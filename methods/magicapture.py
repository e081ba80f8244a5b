"""MagiCapture: Hyung et al., "MagiCapture: High-Resolution Multi-Concept Portrait Customization" (AAAI 2024,
arXiv 2309.06895).

Two concepts, a subject [V1] (from the subject's images) and a style [V2] (from the style's images), are
learned together in one model, in two phases (Sec. 3; verify): first the two token embeddings alone, then
LoRA on the UNet's attention projections together with the embeddings. Every step sees images of both
concepts, with two losses besides the usual noise prediction:

- the masked reconstruction loss: each image's noise-prediction error counts only inside its concept's
  region, ``L_mask = E || M (.) (eps - eps_theta(z_t, t, y)) ||^2`` (averaged over the region), so a token
  does not absorb what lies outside its region (the paper masks the face for the subject's images);
- the attention refocusing loss: each concept token's cross-attention map ``A_V`` is confined to its
  region, ``L_AR = E || A_V (.) (1 - M) ||^2`` over every cross-attention layer (the paper: the same, to
  keep the two tokens' attention apart), weighted by ``refocus_weight``.

Embedded world (data set embedded-composition): the subject is the held-out diamond shape (green
diamonds, captioned "a large green [V1] on a ... background"), the style the held-out orange color
(orange circles, "a large [V2] circle on a ... background"); the region of both is the object's exact
mask from the renderer (at the latents' 8x8 for the loss, at each attention map's size for L_AR: the
embedded UNet's cross-attention is 4x4). The paper's composed prompt splits a portrait into face and
style regions; a shape and a color share the object's region, so the captions split them by words
instead (each caption names the other attribute with a known word). Not reproduced: the identity loss
(a face-recognition network), the paper's post-processing (face restoration and super-resolution).
The composition prompt "a large [V2] [V1] on a black background" succeeds when the sample shows an orange
diamond (attribute-accuracy).

Baseline (``--joint false --masked-loss false --refocus-weight 0``): each concept trained on its own
(the same two phases, the plain loss), then merged: both token embeddings in the text encoder and both
LoRAs active at once (diffusers' multi-adapter ``set_adapters``), the usual way of combining separately
trained concepts.

Saved: ``<concept>/learned_embeds.safetensors`` (diffusers' textual-inversion format) and the LoRA in
diffusers' format (``joint/pytorch_lora_weights.safetensors``, or ``<concept>/`` for each separate one);
``load`` puts them into a ``StableDiffusionPipeline``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from peft import LoraConfig

from bench.claim import Arm, Claim
from bench.embedded.tokenizer import tokenize
from bench.errors import BenchError
from bench.finetune import (Budget, BudgetMeter, diffusion_loss, encode_prompts, sample_latents, saved_bytes,
                            trainable_parameters, training_scheduler)
from bench.interfaces import DiffusionModel, MethodCard
from bench.personalization import Subject, load_personalization_set
from bench.validate import check_bool, check_option
from methods.lora import LORA_FILE, TARGET_MODULES, add_lora, save_lora
from methods.p2p import controlled_attention
from methods.personalization import NewTokens, PersonalizationArgs, PersonalizationMethod, TrainingData
from methods.textual_inversion import EMBEDS_FILE

JOINT = "joint"  # the joint adapter's name and folder
COMPOSITION_METRICS = ("attribute-accuracy", "latency")


@dataclass(frozen=True)
class MagiCaptureArgs(PersonalizationArgs):
    embedding_steps: int = field(default=200, metadata={"help": "phase 1: optimizer steps on the two embeddings alone"})
    embedding_learning_rate: float = field(default=5e-2, metadata={"help": "phase 1's AdamW learning rate"})
    train_steps: int = field(default=400, metadata={"help": "phase 2: optimizer steps on LoRA and the embeddings"})
    learning_rate: float = field(default=2e-3, metadata={"help": "phase 2's AdamW learning rate (constant)"})
    rank: int = field(default=4, metadata={"help": "LoRA rank r"})
    alpha: float = field(default=4.0, metadata={"help": "lora_alpha (the update is scaled by alpha / r)"})
    joint: bool = field(default=True, metadata={"help": "train both concepts in one model (false: each on its own, "
                                                        "then both LoRAs and embeddings merged)"})
    masked_loss: bool = field(default=True, metadata={"help": "the noise-prediction loss inside each concept's mask "
                                                              "only"})
    refocus_weight: float = field(default=1.0, metadata={"help": "weight of the attention refocusing loss (0: off)"})
    style_initializer: str = field(default="sks", metadata={"help": "the word whose embedding starts [V2] ([V1] "
                                                                    "starts as the subject's class noun)"})
    drift_samples: int = field(default=0, metadata={"help": "not measured by magicapture (must be 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("embedding_steps", self.embedding_steps, 0, integer=True)
        check_option("embedding_learning_rate", self.embedding_learning_rate, 0, lo_open=True)
        check_option("rank", self.rank, 1, integer=True)
        check_option("alpha", self.alpha, 0, lo_open=True)
        check_bool("joint", self.joint)
        check_bool("masked_loss", self.masked_loss)
        check_option("refocus_weight", self.refocus_weight, 0)
        if self.drift_samples:
            raise BenchError("--drift-samples: magicapture does not measure prior drift; leave it 0")


def composition(method: str, **options: Any) -> Arm:
    """MagiCapture's arm on embedded-composition: 96 samples (6 composed prompts x 16), one seed, DDIM 25 steps;
    --quick: 12 samples, 10 steps, 20 + 40 training steps."""
    return Arm(method, 25, dict(options), model="embedded-t2i", dataset="embedded-composition", num_samples=96,
               seeds=(0,), quick_num_samples=12, quick_seeds=(0,), quick_steps=10, metrics=COMPOSITION_METRICS,
               batch_size=96, quick_options={"embedding_steps": 20, "train_steps": 40})


def latent_masks(masks: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Coverage masks [N, H, W] -> [N, 1, h, w] at ``size`` (area averages: the fraction of each cell covered)."""
    return F.adaptive_avg_pool2d(masks[:, None].float(), tuple(size))


class AttentionRecorder:
    """A controller for methods.p2p's processors: keeps every cross-attention probability map, changes none."""

    def __init__(self) -> None:
        self.maps: list[tuple[torch.Tensor, int]] = []

    def __call__(self, probs: torch.Tensor, is_cross: bool, name: str, heads: int) -> torch.Tensor:
        if is_cross:
            self.maps.append((probs, heads))
        return probs


def refocus_loss(maps: Sequence[tuple[torch.Tensor, int]], positions: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_AR: mean over layers of the mean over samples and cells of (A_V (.) (1 - M))^2.

    ``maps``: (probabilities [B * heads, cells, tokens], heads) of each cross-attention layer; ``positions``: bool
    [B, tokens], where each sample's concept token is; ``masks``: [B, H, W] coverage of each sample's concept.
    A_V is the token's attention, averaged over heads, at each cell of the layer's square map.
    """
    if not maps:
        raise BenchError("the attention refocusing loss found no cross-attention layer in the UNet")
    terms = []
    for probs, heads in maps:
        b = positions.shape[0]
        probs = probs.reshape(b, heads, probs.shape[1], probs.shape[2])
        attention = (probs * positions[:, None, None, :].to(probs)).sum(-1).mean(1)  # [B, cells]
        side = int(round(math.sqrt(attention.shape[1])))
        outside = 1 - latent_masks(masks, (side, side)).to(attention).flatten(1)
        terms.append(((attention * outside) ** 2).mean())
    return torch.stack(terms).mean()


class MagiCapture(PersonalizationMethod):
    name = "magicapture"
    summary = "MagiCapture: a subject and a style learned jointly (masked loss, attention refocusing, 2 phases)"
    paper = "Hyung et al. 2024, MagiCapture: High-Resolution Multi-Concept Portrait Customization"
    saves = (f"<concept>/{EMBEDS_FILE} (diffusers' textual-inversion format) and the LoRA "
             f"({JOINT}/{LORA_FILE}, or <concept>/{LORA_FILE} with --joint false)")
    default_dataset: ClassVar[str | None] = "embedded-composition"
    card = MethodCard(
        citation="Junha Hyung, Jaeyo Shin, Jaegul Choo. MagiCapture: High-Resolution Multi-Concept Portrait "
        "Customization. AAAI 2024; arXiv 2309.06895.",
        url="https://arxiv.org/abs/2309.06895",
        reproduces="A subject and a style token learned jointly in one model, in two phases (the embeddings, then "
        "LoRA with the embeddings), with the masked reconstruction loss and the attention refocusing loss on every "
        "cross-attention map (diffusers attention processors); the baseline trains each concept alone with the "
        "plain loss and merges the two LoRAs and embeddings. Embedded world: subject = the held-out diamond shape, "
        "style = the held-out orange color, regions = the renderer's exact object masks; not reproduced: the "
        "identity loss and the post-processing (face restoration).",
        reference="Paper (Sec. 4 and the user study; verify): higher identity similarity and style fidelity than "
        "DreamBooth, Textual Inversion and Custom Diffusion on composed portraits, and fewer artifacts; the "
        "ablation without the attention refocusing loss mixes the concepts' attributes.",
        embedded_claim="Learned jointly with the masked and refocusing losses, the two held-out concepts compose "
        "(an orange diamond from 'a large [V2] [V1] ...': shape, color, background and count right) more often "
        "than when trained separately with the plain loss and merged. Decided by `bench claims --method "
        "magicapture` (the verdict and the values: its latest MLflow claims run, `bench report`).",
    )
    Args: ClassVar[type] = MagiCaptureArgs
    claims = (
        Claim("joint-composes-better", "the two concepts learned jointly (masked reconstruction and attention "
              "refocusing) compose more often than trained separately and merged: attribute accuracy of the "
              "composed prompt", "Sec. 4 (verify): composed portraits keep identity and style better than "
              "separately trained concepts; without refocusing, attributes mix", "attr_acc_all",
              (("joint", composition("magicapture")),
               ("separate, merged", composition("magicapture", joint=False, masked_loss=False, refocus_weight=0.0))),
              "greater", tolerance="margin"),
    )

    def __init__(self, args: Any):
        super().__init__(args)
        self.tokens: NewTokens | None = None
        self.adapters: list[str] = []

    @staticmethod
    def planned_train_steps(args: MagiCaptureArgs) -> int:
        """The optimizer steps prepare() takes (`bench claims --plan`): both phases, once per trained adapter."""
        return (args.embedding_steps + args.train_steps) * (1 if args.joint else 2)

    def phrase(self, subject: Subject) -> str:
        return subject.token

    def check_dataset(self, reference: Any) -> None:
        super().check_dataset(reference)
        if getattr(reference, "composition", None) is None:
            raise BenchError(f"method 'magicapture' learns a subject and a style and asks for them together: it needs a "
                             f"composition data set (embedded-composition), not {reference.name}")

    def config(self) -> LoraConfig:
        return LoraConfig(r=self.args.rank, lora_alpha=self.args.alpha, init_lora_weights="gaussian",
                          target_modules=list(TARGET_MODULES))

    # -- training ----------------------------------------------------------------------------------------------------------
    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        reference = load_personalization_set(spec.dataset)
        self.check_dataset(reference)
        roles = reference.composition
        subjects = {s.name: s for s in reference.subjects()}
        missing = {roles.subject, roles.style} - set(subjects)
        if missing:
            raise BenchError(f"data set {reference.name} has no subject {', '.join(sorted(missing))}")
        subject, style = subjects[roles.subject], subjects[roles.style]
        concepts = [subject, style]
        for s in concepts:
            if s.masks is None:
                raise BenchError(f"subject {s.name} of {reference.name} has no masks (the masked and refocusing losses "
                                 f"need each concept's region)")
        self.subjects = {s.name: s for s in concepts}
        self.tokens = NewTokens(model, [s.token for s in concepts], [subject.class_noun, self.args.style_initializer])
        device = next(model.unet.parameters()).device
        workdir = Path(workdir)
        data = {s.name: self.training_data(model, reference, s, spec) for s in concepts}
        groups = [(JOINT, concepts)] if self.args.joint else [(f"concept_{s.name}", [s]) for s in concepts]
        total, params, losses = Budget(device=str(device)), 0, {}
        for adapter, group in groups:
            with BudgetMeter(device) as meter:
                count, losses[adapter] = self.train_concepts(model, group, data, adapter)
            folders = []
            for s in group:
                folder = workdir / s.name
                folder.mkdir(parents=True, exist_ok=True)
                self.tokens.finish(s.token)
                self.tokens.save(s.token, folder / EMBEDS_FILE)
                folders.append(folder)
            if self.args.train_steps > 0:
                lora_folder = workdir / (JOINT if self.args.joint else group[0].name)
                lora_folder.mkdir(parents=True, exist_ok=True)
                save_lora(model, adapter, lora_folder)
                self.adapters.append(adapter)
                folders = sorted(set(folders) | {lora_folder})
            steps = self.args.embedding_steps + self.args.train_steps
            total = total.add(meter.budget(steps, count, saved_bytes(folders)))
            params += count
        values = total.metrics()
        values["train_params"] = float(params)  # every concept's parameters (the joint model trains them at once)
        report = {"method": self.name, "args": dataclasses.asdict(self.args), "dataset": reference.name,
                  "budget": total.to_dict(), "adapters": self.adapters,
                  "final_loss_mean_last_50": {k: (sum(v[-50:]) / len(v[-50:]) if v else None) for k, v in losses.items()},
                  "saved": self.saves, "metrics": values}
        (workdir / "budget.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        return values

    def train_concepts(self, model: DiffusionModel, concepts: Sequence[Subject], data: dict[str, TrainingData],
                       adapter: str) -> tuple[int, list[float]]:
        """Phase 1 (the embeddings), then phase 2 (LoRA ``adapter`` and the embeddings) on ``concepts`` together."""
        args = self.args
        gen = torch.Generator().manual_seed(args.train_seed)
        scheduler = training_scheduler(model)
        for module in (model.unet, model.text_encoder, model.vae):
            module.requires_grad_(False)
        vectors = [self.tokens.train_row(s.token) for s in concepts]
        pixel_masks = {s.name: torch.from_numpy(s.masks) for s in concepts}
        latent_size = tuple(data[concepts[0].name].mean.shape[-2:])
        recorder = AttentionRecorder()
        refocus = args.refocus_weight > 0
        trained: list[torch.nn.Parameter] = list(vectors)
        losses: list[float] = []
        model.unet.train()
        model.text_encoder.train()
        try:
            for steps, lr, with_lora in ((args.embedding_steps, args.embedding_learning_rate, False),
                                         (args.train_steps, args.learning_rate, True)):
                if steps == 0:
                    continue
                params = vectors + (add_lora(model, self.config(), adapter, args.train_seed) if with_lora else [])
                trained = params
                opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
                with controlled_attention(model.unet, recorder) if refocus else contextlib.nullcontext():
                    for _ in range(steps):
                        losses.append(self._step(model, scheduler, concepts, data, pixel_masks, latent_size,
                                                 recorder, opt, params, gen))
            count = trainable_parameters(trained)
        finally:
            model.unet.eval()
            model.text_encoder.eval()
            for p in trained:
                p.requires_grad_(False)
        return count, losses

    def _step(self, model, scheduler, concepts, data, pixel_masks, latent_size, recorder, opt, params, gen) -> float:
        """One optimizer step on ``train_batch_size`` images of every concept."""
        args = self.args
        latents, captions, masks, token_ids = [], [], [], []
        for s in concepts:
            d = data[s.name]
            idx = torch.randint(0, len(d.mean), (args.train_batch_size,), generator=gen)
            latents.append(sample_latents(model, d.mean[idx], d.std[idx], gen))
            captions += [d.captions[i] for i in idx]
            masks.append(pixel_masks[s.name][idx])
            token_ids += [self.tokens.ids[s.token]] * len(idx)
        latents, masks = torch.cat(latents), torch.cat(masks).to(latents[0].device)
        recorder.maps = []
        hidden = encode_prompts(model, captions, grad=True)
        loss_mask = latent_masks(masks, latent_size) if args.masked_loss else None
        loss = diffusion_loss(model.unet, scheduler, latents, hidden, gen, mask=loss_mask)
        if args.refocus_weight > 0:
            ids = tokenize(model.tokenizer, captions).to(latents.device)
            positions = ids == torch.tensor(token_ids, device=ids.device)[:, None]
            loss = loss + args.refocus_weight * refocus_loss(recorder.maps, positions, masks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return float(loss.detach())

    # -- generation ----------------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self, model: DiffusionModel, subject: Subject | None):
        """Both concepts' adapters (the joint one, or the separate ones merged) for any prompt naming a concept."""
        if subject is None or not self.adapters:
            yield
            return
        model.pipeline.enable_lora()
        model.pipeline.set_adapters(list(self.adapters), adapter_weights=[1.0] * len(self.adapters))
        try:
            yield
        finally:
            model.pipeline.disable_lora()

    def prompt_subject(self, text: str) -> Subject | None:
        """A prompt may name both concepts (one model serves both): any prompt naming one gets the trained model."""
        concepts = list(self.subjects.values())
        return concepts[0] if any(s.token in text for s in concepts) else None

def load(pipeline: Any, workdir: Path) -> None:
    """Load a trained pair (the run's ``method/`` folder) into a ``StableDiffusionPipeline``: every concept's token and
    the LoRA (the joint one, or each separate one, all active)."""
    workdir = Path(workdir)
    names = []
    for embeds in sorted(workdir.glob(f"*/{EMBEDS_FILE}")):
        pipeline.load_textual_inversion(str(embeds))
    for lora in sorted(workdir.glob(f"*/{LORA_FILE}")):
        name = JOINT if lora.parent.name == JOINT else f"concept_{lora.parent.name}"
        pipeline.load_lora_weights(str(lora.parent), weight_name=LORA_FILE, adapter_name=name)
        names.append(name)
    if names:
        pipeline.set_adapters(names, adapter_weights=[1.0] * len(names))
