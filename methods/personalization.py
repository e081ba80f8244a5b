"""The shared loop of the personalization adapters: train one adapter per subject in ``prepare``, then generate with CFG.

DreamBench's protocol (Ruiz et al. 2023, Sec. 4.1) fine-tunes once per subject and generates
every prompt of that subject with its own adapter. ``prepare`` does so for every subject of the
data set: it trains the paper's parameters (``train_subject``, each paper's module), saves what
the paper saves into ``workdir/<subject>/`` (logged as MLflow artifacts), records the budget, puts
the model back as it was, and measures the prior drift (of the model that generates). ``generate`` groups a batch by the
subject its prompts name (``<subject>`` tokens), activates that subject's adapter, writes the
subject the method's way (``phrase``) and samples with ``LatentTextToImage`` (CFG, the
configured scheduler).

Training (all methods): AdamW on the paper's parameters, a constant learning rate, gradient
clipping at 1 (diffusers' training scripts), batches of ``train_batch_size`` subject images drawn with
replacement, their captions with the subject phrase, latents drawn from the frozen VAE's
posterior, the noise-prediction loss (``bench.finetune.diffusion_loss``). With prior
preservation (DreamBooth eq. 2) each step adds ``train_batch_size`` class images, weighted by
``prior_weight``.

Prior drift: ``drift_samples`` images of the subject's class prompts (no subject) from the model
before and after fine-tuning, with the same seeds, prompts and sampler; ``prior_drift`` is the FID
between the two sets in the data set's features (shapes-cnn32 on the embedded world): 0 for an
untouched class. On the embedded world ``prior_heldout_rate`` adds the fraction of class samples
that show the subject's held-out shape or color after fine-tuning (``_base`` before).

Seeds: class images for prior preservation use per-sample seeds ``sample_seed(seed, 2_000_000+i)``,
prior-drift samples ``sample_seed(seed, 1_000_000+i)`` (``seed`` = the run's seed), so neither
overlaps the run's own samples; training draws from ``torch.Generator().manual_seed(train_seed)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from bench.denoiser import CountingDenoiser, sample_seed
from bench.errors import BenchError
from bench.files import cache_dir
from bench.finetune import (Budget, BudgetMeter, diffusion_loss, encode_images, encode_prompts, sample_latents,
                            saved_bytes, trainable_parameters, training_scheduler)
from bench.images import to_uint8
from bench.interfaces import Batch, DiffusionModel
from bench.personalization import PersonalizationSet, Subject, load_personalization_set, subject_of
from bench.spec import stable_hash
from bench.validate import check_bool, check_option
from methods.text_to_image import SDXL_KIND, GuidanceArgs, LatentTextToImage, sdxl_conditioning
from metrics.personalization import frechet_distance, heldout_rate

DRIFT_OFFSET = 1_000_000
CLASS_IMAGE_OFFSET = 2_000_000
CLASS_BATCH = 64


def _positive(name: str, value: Any, integer: bool = True, zero: bool = False) -> None:
    check_option(name, value, 0, integer=integer, lo_open=not zero)


@dataclass(frozen=True)
class PersonalizationArgs(GuidanceArgs):
    train_steps: int = field(default=400, metadata={"help": "optimizer steps per subject (0: the untuned model)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate (constant)"})
    train_batch_size: int = field(default=4, metadata={"help": "subject images per step (and as many class images)"})
    train_seed: int = field(default=0, metadata={"help": "seed of the training draws (images, noise, timesteps)"})
    drift_samples: int = field(default=128, metadata={"help": "class-prompt samples per subject for prior drift "
                                                              "(0: not measured; FID needs 2x the feature dimension)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("train_steps", self.train_steps, zero=True)
        _positive("learning_rate", self.learning_rate, integer=False)
        _positive("train_batch_size", self.train_batch_size)
        _positive("train_seed", self.train_seed, zero=True)
        _positive("drift_samples", self.drift_samples, zero=True)


@dataclass(frozen=True)
class PriorArgs(PersonalizationArgs):
    """Options of the methods that may add DreamBooth's prior-preservation loss."""

    prior_preservation: bool = field(default=True, metadata={"help": "add the class-prior loss (DreamBooth eq. 2)"})
    prior_weight: float = field(default=1.0, metadata={"help": "lambda, the weight of the prior loss"})
    num_class_images: int = field(default=64, metadata={"help": "class images per subject for the prior loss"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool("prior_preservation", self.prior_preservation)
        _positive("prior_weight", self.prior_weight, integer=False, zero=True)
        _positive("num_class_images", self.num_class_images)


@dataclass
class TrainingData:
    """What one subject's training draws from: posterior latents and captions (subject, then class)."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: list[str]
    class_mean: torch.Tensor | None = None
    class_std: torch.Tensor | None = None
    class_captions: list[str] = field(default_factory=list)


class PersonalizationMethod(LatentTextToImage):
    """Base of the four adapters; a subclass supplies the paper's parts (the hooks below)."""

    default_dataset: ClassVar[str | None] = "embedded-concepts"
    Args: ClassVar[type] = PersonalizationArgs
    saves: ClassVar[str] = ""  # what ``workdir/<subject>/`` holds (the card and the README name it)

    def __init__(self, args: Any):
        super().__init__(args)
        self.subjects: dict[str, Subject] = {}
        self.report: dict[str, Any] = {}

    # -- the paper's parts ----------------------------------------------------------------------------------------------
    def phrase(self, subject: Subject) -> str:
        """How the method writes the subject into a prompt's ``{}``."""
        raise NotImplementedError

    def setup(self, model: DiffusionModel, subjects: Sequence[Subject]) -> None:
        """Before any training (e.g. new tokens in the tokenizer)."""

    def trainable(self, model: DiffusionModel, subject: Subject) -> list[torch.nn.Parameter]:
        """Make the paper's parameters trainable for ``subject`` (the rest frozen) and return them."""
        raise NotImplementedError

    def finish(self, model: DiffusionModel, subject: Subject, folder: Path) -> None:
        """Save the subject's adapter into ``folder``, keep it for generation, put the model back as it was."""
        raise NotImplementedError

    def after_training(self, model: DiffusionModel, subjects: Sequence[Subject], workdir: Path) -> dict[str, float]:
        """After every subject is trained (Custom Diffusion merges them here); extra metrics."""
        return {}

    @contextlib.contextmanager
    def activate(self, model: DiffusionModel, subject: Subject | None) -> Iterator[None]:
        """The model with ``subject``'s adapter (None: the untouched model) for the duration of the block."""
        yield

    def uses_prior(self) -> bool:
        return bool(getattr(self.args, "prior_preservation", False))

    def real_class_images(self) -> bool:
        """Whether prior preservation uses the data set's real class images when it has them (Custom Diffusion)."""
        return False

    # -- checks -------------------------------------------------------------------------------------------------------------
    def check_dataset(self, reference: Any) -> None:
        if not isinstance(reference, PersonalizationSet):
            raise BenchError(f"method {self.name!r} trains on a personalization data set (subjects with images), "
                             f"not {reference.name}; use --dataset embedded-concepts or dreambench")

    # -- prepare: train every subject -------------------------------------------------------------------------------------
    def prepare(self, model: DiffusionModel, spec: Any, workdir: Path) -> dict[str, float]:
        reference = load_personalization_set(spec.dataset)
        subjects = reference.subjects()
        self.subjects = {s.name: s for s in subjects}
        device = next(model.unet.parameters()).device
        workdir = Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        drift = self.args.drift_samples > 0
        base_class = {s.name: self.class_samples(model, s, spec, DRIFT_OFFSET, self.args.drift_samples, cached=True)
                      for s in subjects} if drift else {}
        self.setup(model, subjects)
        total = Budget(device=str(device))
        per_subject: dict[str, Any] = {}
        for subject in subjects:
            data = self.training_data(model, reference, subject, spec)
            with BudgetMeter(device) as meter:
                params, losses = self.train_subject(model, subject, data)
            folder = workdir / subject.name
            folder.mkdir(parents=True, exist_ok=True)
            self.finish(model, subject, folder)
            budget = meter.budget(self.args.train_steps, params, saved_bytes([folder]))
            total = total.add(budget)
            per_subject[subject.name] = {"budget": budget.to_dict(),
                                         "final_loss_mean_last_50": float(np.mean(losses[-50:])) if losses else None}
        values = total.metrics()
        values.update(self.after_training(model, subjects, workdir))
        if drift:  # of the model that generates: after after_training (Custom Diffusion's merge)
            values.update(self.prior_drift(model, reference, subjects, spec, base_class, per_subject))
        self.report = {"method": self.name, "args": dataclasses.asdict(self.args), "dataset": reference.name,
                       "budget": total.to_dict(), "subjects": per_subject, "saved": self.saves,
                       "metrics": values}
        (workdir / "budget.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        return values

    def training_data(self, model: DiffusionModel, reference: PersonalizationSet, subject: Subject, spec: Any) -> TrainingData:
        mean, std = encode_images(model, subject.images_tensor())
        phrase = self.phrase(subject)
        data = TrainingData(mean, std, [c.format(phrase) for c in subject.captions])
        if self.uses_prior():
            n = self.args.num_class_images
            real = reference.class_reference(subject, n, spec.seed) if self.real_class_images() else None
            if real is not None:
                images, captions = torch.from_numpy(real[0]).permute(0, 3, 1, 2).contiguous(), real[1]
            else:  # DreamBooth: the model's own samples of the class prompts
                images = self.class_samples(model, subject, spec, CLASS_IMAGE_OFFSET, n, cached=True)
                captions = [subject.class_prompts[i % len(subject.class_prompts)] for i in range(n)]
            data.class_mean, data.class_std = encode_images(model, images)
            data.class_captions = list(captions)
        return data

    def train_subject(self, model: DiffusionModel, subject: Subject, data: TrainingData) -> tuple[int, list[float]]:
        """The training loop (subject loss + prior_weight x class loss); returns (trained parameters, losses)."""
        args = self.args
        gen = torch.Generator().manual_seed(args.train_seed)
        scheduler = training_scheduler(model)
        for module in (model.unet, model.text_encoder, model.vae):
            module.requires_grad_(False)
        params = self.trainable(model, subject)
        count = trainable_parameters(params)
        opt = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=getattr(args, "weight_decay", 1e-2))
        model.unet.train()
        model.text_encoder.train()
        losses = []
        prior = data.class_mean is not None
        try:
            for _ in range(args.train_steps):
                idx = torch.randint(0, len(data.mean), (args.train_batch_size,), generator=gen)
                latents = sample_latents(model, data.mean[idx], data.std[idx], gen)
                captions = [data.captions[i] for i in idx]
                if prior:
                    cidx = torch.randint(0, len(data.class_mean), (args.train_batch_size,), generator=gen)
                    latents = torch.cat([latents, sample_latents(model, data.class_mean[cidx], data.class_std[cidx], gen)])
                    captions += [data.class_captions[i] for i in cidx]
                cond = self.training_conditioning(model, captions, latents)
                per_sample = diffusion_loss(model.unet, scheduler, latents, cond["encoder_hidden_states"], gen,
                                            reduction="none", added_cond_kwargs=cond.get("added_cond_kwargs"))
                loss = per_sample[: args.train_batch_size].mean()
                if prior:
                    loss = loss + args.prior_weight * per_sample[args.train_batch_size :].mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                losses.append(float(loss.detach()))
        finally:
            model.unet.eval()
            model.text_encoder.eval()
            for p in params:
                p.requires_grad_(False)
        return count, losses

    def training_conditioning(self, model: DiffusionModel, captions: Sequence[str],
                              latents: torch.Tensor) -> dict[str, Any]:
        """The UNet's text conditioning of a training batch: the text encoder's hidden states (SD-1.x, tokenized as
        the embedded model was trained; the graph kept for methods that train the text side), or on SDXL the
        text-to-image loop's ``sdxl_conditioning`` (no guidance branch) with the micro-conditioning of the training
        images themselves: their size as original and target size, no crop (diffusers' train_dreambooth_lora_sdxl.py
        ``compute_time_ids`` for uncropped images at the training resolution)."""
        if model.kind != SDXL_KIND:
            return {"encoder_hidden_states": encode_prompts(model, captions, grad=True)}
        scale = model.pipeline.vae_scale_factor
        size = [latents.shape[-2] * scale, latents.shape[-1] * scale]
        micro = {"original_size": size, "crops_coords_top_left": [0, 0], "target_size": size}
        param = next(model.unet.parameters())
        return sdxl_conditioning(model, captions, False, param.device, param.dtype, micro)

    # -- sampling -------------------------------------------------------------------------------------------------------------
    def prompt_subject(self, text: str) -> Subject | None:
        """The subject whose adapter generates ``text`` (None: the untouched model); one subject per prompt."""
        return subject_of(text, list(self.subjects.values()))

    def _prompt_text(self, text: str, subject: Subject | None) -> str:
        return text if subject is None else text.replace(subject.token, self.phrase(subject))

    @torch.no_grad()
    def generate(self, model: DiffusionModel, batch: Batch, denoiser) -> torch.Tensor:
        seeds, prompts = batch.seeds, batch.prompts
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds")
        if not self.subjects:
            raise BenchError(f"method {self.name!r} generates after prepare() has trained its subjects")
        groups: dict[str | None, list[int]] = {}
        for i, text in enumerate(prompts):  # a prompt without a subject gets the untouched model
            s = self.prompt_subject(text)
            groups.setdefault(s.name if s else None, []).append(i)
        out: list[torch.Tensor | None] = [None] * len(seeds)
        for name, idx in groups.items():
            subject = self.subjects.get(name) if name else None
            with self.activate(model, subject):
                part = Batch(seeds=tuple(seeds[i] for i in idx), steps=batch.steps,
                             indices=tuple(batch.indices[i] for i in idx),
                             prompts=tuple(self._prompt_text(prompts[i], subject) for i in idx))
                images = super().generate(model, part, denoiser)
            for j, i in enumerate(idx):
                out[i] = images[j]
        return torch.stack(out)  # type: ignore[arg-type]

    def class_samples(self, model: DiffusionModel, subject: Subject, spec: Any, offset: int, n: int,
                      cached: bool = False) -> torch.Tensor:
        """uint8 [n, 3, H, W]: the untouched model's (or, inside ``activate``, the adapted model's) class samples.

        ``cached``: the untouched model's samples are a pure function of the model's digest, the prompts, the
        seeds and the sampler, so they are kept on disk under a key of all of them (a sweep makes them once).
        """
        seeds = [sample_seed(spec.seed, offset + i) for i in range(n)]
        prompts = [subject.class_prompts[i % len(subject.class_prompts)] for i in range(n)]
        device = next(model.unet.parameters()).device
        key = {"model": model.digest, "prompts": prompts, "seeds": seeds, "steps": spec.steps, "dtype": spec.dtype,
               "device": device.type, "scheduler": self.resolved_config(model), "guidance": self.guidance_scale(),
               "batch": CLASS_BATCH}
        path = cache_dir() / "class-samples" / f"{stable_hash(key)}.npy"
        if cached and path.is_file():
            try:
                return torch.from_numpy(np.load(path, allow_pickle=False)).permute(0, 3, 1, 2).contiguous()
            except (OSError, ValueError):  # a damaged cache entry is recomputed, never trusted
                pass
        denoiser = CountingDenoiser(model.unet, device)
        batch = CLASS_BATCH  # fixed, not the run's batch size: CPU kernels round differently by batch size
        chunks = [LatentTextToImage.generate(self, model, Batch(seeds=tuple(seeds[a : a + batch]), steps=spec.steps,
                                                                prompts=tuple(prompts[a : a + batch])), denoiser)
                  for a in range(0, n, batch)]
        images = to_uint8(torch.cat(chunks))
        if cached:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            with open(tmp, "wb") as f:
                np.save(f, images, allow_pickle=False)
            os.replace(tmp, path)
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def prior_drift(self, model, reference, subjects, spec, base_class, per_subject) -> dict[str, float]:
        """FID(class samples before, after) per subject in the data set's features; the mean over subjects."""
        drifts, rates, base_rates = [], [], []
        for subject in subjects:
            with self.activate(model, subject):
                tuned = self.class_samples(model, subject, spec, DRIFT_OFFSET, self.args.drift_samples)
            base = base_class[subject.name]
            fid = 0.0 if torch.equal(base, tuned) else frechet_distance(base, tuned, reference.feature_extractor)
            entry: dict[str, float] = {"prior_drift": fid, "identical_class_samples": float(torch.equal(base, tuned))}
            if reference.embedded:
                truth = subject.prompt_attributes[0] if subject.prompt_attributes else None
                entry["prior_heldout_rate"] = heldout_rate(tuned, truth)
                entry["prior_heldout_rate_base"] = heldout_rate(base, truth)
                rates.append(entry["prior_heldout_rate"])
                base_rates.append(entry["prior_heldout_rate_base"])
            per_subject[subject.name]["prior"] = entry
            drifts.append(fid)
        values = {"prior_drift": float(np.mean(drifts))}
        if rates:
            values["prior_heldout_rate"] = float(np.nanmean(rates))
            values["prior_heldout_rate_base"] = float(np.nanmean(base_rates))
        return values


def state_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over a state dict's names and bytes (tests: same seed, same weights)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class NewTokens:
    """Placeholder tokens added to the tokenizer and the text encoder (Textual Inversion, Custom Diffusion's V*).

    Each new row starts as a copy of its initializer word's row. Training one token trains a separate vector
    that a forward hook on the token-embedding layer writes into the positions of that token: the optimizer sees
    only the row it learns (diffusers' textual_inversion.py trains the whole matrix and puts the other rows back
    after each step; the result is the same, at a fraction of the cost on a 49,408-row vocabulary). ``finish``
    writes the learned vector into the embedding matrix.
    """

    def __init__(self, model: DiffusionModel, tokens: Sequence[str], initializers: Sequence[str]):
        tokenizer, encoder = model.tokenizer, model.text_encoder
        if any(t in tokenizer.get_vocab() for t in tokens):
            raise BenchError(f"the tokenizer already has one of {', '.join(tokens)}")
        init_ids = []
        for word in initializers:
            ids = tokenizer(word, add_special_tokens=False).input_ids
            if len(ids) != 1:
                raise BenchError(f"initializer {word!r} is {len(ids)} tokens; it must be one token of the vocabulary")
            init_ids.append(ids[0])
        tokenizer.add_tokens(list(tokens))
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        self.model = model
        self.ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
        weight = self.weight
        with torch.no_grad():
            for t, i in zip(tokens, init_ids):
                weight[self.ids[t]] = weight[i]
        self._hooks: dict[str, Any] = {}
        self._vectors: dict[str, Callable[[], torch.Tensor]] = {}

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.model.text_encoder.get_input_embeddings().weight

    def train_row(self, token: str) -> torch.nn.Parameter:
        """A trainable copy of ``token``'s row, used wherever the token occurs until ``finish``."""
        vector = torch.nn.Parameter(self.weight[self.ids[token]].detach().clone())
        self.bind(token, lambda: vector)
        return vector

    def bind(self, token: str, make_vector: Callable[[], torch.Tensor]) -> None:
        """Use ``make_vector()`` (a function of trained parameters: Celeb Basis's coefficients) as ``token``'s row
        wherever the token occurs, until ``finish``; several tokens may be bound at once (MagiCapture)."""
        token_id = self.ids[token]

        def put(module: Any, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            where = (inputs[0] == token_id).unsqueeze(-1)
            if not bool(where.any()):
                return output
            return torch.where(where, make_vector().to(output.dtype), output)

        self._hooks[token] = self.model.text_encoder.get_input_embeddings().register_forward_hook(put)
        self._vectors[token] = make_vector

    def finish(self, token: str) -> None:
        """Write the learned vector into the embedding matrix; the hook goes."""
        hook = self._hooks.pop(token, None)
        if hook is not None:
            hook.remove()
        make_vector = self._vectors.pop(token, None)
        if make_vector is not None:
            with torch.no_grad():
                self.weight[self.ids[token]] = make_vector().detach()

    def save(self, token: str, path: Path) -> None:
        """diffusers' textual-inversion file: {token: [1, dim]} (``load_textual_inversion`` reads it)."""
        i = self.ids[token]
        save_file({token: self.weight[i : i + 1].detach().cpu().clone().contiguous()}, str(path))
