"""The part LoRA, VeRA, LoHa and LoKr share: one peft adapter per subject on the UNet's attention projections.

Each paper's module gives its peft config (``config()``), its ``Args``, card and claims; this module does the rest.
Per subject it injects the config into the UNet as adapter ``subject_<name>`` (seeded by ``train_seed``: the
adapters' random initializations draw from the global generator), trains the parameters peft registers under that
adapter's name (the loop is ``PersonalizationMethod.train_subject``), saves the adapter in its file format, loads the
saved file back for generation, and switches it on only for its subject's prompts. Two formats:

- ``DiffusersLoRAFile`` (LoRA): diffusers' LoRA file, ``pytorch_lora_weights.safetensors`` written by
  ``StableDiffusionPipeline.save_lora_weights`` (``StableDiffusionXLPipeline``'s on SDXL) and loaded by the model's
  pipeline's ``load_lora_weights``, one named adapter per subject.
- ``PeftFile`` (VeRA, LoHa, LoKr, which diffusers' LoRA loader does not read): peft's own adapter folder,
  ``adapter_config.json`` and ``adapter_model.safetensors`` with the keys ``PeftModel.save_pretrained`` writes
  (``get_peft_model_state_dict`` of the wrapped UNet), loaded back with ``set_peft_model_state_dict`` in the run and
  with ``PeftModel.from_pretrained(unet, folder)`` anywhere else (``load_peft_adapter``). The UNet is wrapped by
  ``get_peft_model`` (in place: the pipeline's UNet is the wrapped model's) instead of the UNet's ``add_adapter``,
  because peft refuses ``inject_adapter_in_model`` for tuners with state shared across layers (VeRA's A and B
  live on the tuner).
"""

from __future__ import annotations

import contextlib
import copy
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator, Sequence

import torch
from peft import PeftConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from bench.errors import BenchError
from bench.interfaces import DiffusionModel
from bench.personalization import Subject
from bench.validate import check_option
from methods.dreambooth import IdentifierArgs, check_identifier
from methods.personalization import PersonalizationMethod
from methods.text_to_image import SDXL_KIND

TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_FILE = "pytorch_lora_weights.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"  # peft.utils.CONFIG_NAME
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"  # peft.utils.SAFETENSORS_WEIGHTS_NAME


@dataclass(frozen=True)
class AdapterArgs(IdentifierArgs):
    """DreamBooth's data ("a [V] [class]"), without the prior loss by default as in diffusers' DreamBooth-LoRA."""

    train_steps: int = field(default=400, metadata={"help": "optimizer steps per subject (0: the untuned model)"})
    learning_rate: float = field(default=2e-3, metadata={"help": "AdamW learning rate of the adapter (constant)"})
    prior_preservation: bool = field(default=False, metadata={"help": "add DreamBooth's class-prior loss"})
    rank: int = field(default=4, metadata={"help": "r, the adapter's rank"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("rank", self.rank, 1, integer=True)


@dataclass(frozen=True)
class ScaledAdapterArgs(AdapterArgs):
    """Adapters whose update is scaled by alpha / r (LoRA, LoHa, LoKr; VeRA's vectors carry their own scale)."""

    alpha: float = field(default=4.0, metadata={"help": "alpha (the update is scaled by alpha / r)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        check_option("alpha", self.alpha, 0, lo_open=True)


def is_sdxl(model: DiffusionModel) -> bool:
    return getattr(model, "kind", None) == SDXL_KIND


def adapter_name(subject: Subject) -> str:
    return f"subject_{subject.name}"


def adapter_parameters(unet: torch.nn.Module, name: str) -> list[torch.nn.Parameter]:
    """The parameters peft registered for adapter ``name`` (``<layer>.<kind>.<name>[.weight]``), in module order."""
    return [p for n, p in unet.named_parameters() if name in n.split(".")]


@contextlib.contextmanager
def quiet_projection_warnings() -> Iterator[None]:
    """peft warns on every VeRA save and load without the projections; regenerating them from the seed is the paper's
    choice (tests/test_peft_adapters.py checks the round trip), so the warning says nothing here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Specified to not (save|load) vera_A and vera_B")
        yield


class DiffusersLoRAFile:
    """LoRA through diffusers: ``unet.add_adapter``, ``save_lora_weights``, ``load_lora_weights``, ``set_adapters``."""

    saves = f"<subject>/{LORA_FILE} (diffusers' LoRA format)"

    def inject(self, model: DiffusionModel, config: PeftConfig, name: str) -> None:
        model.unet.add_adapter(config, adapter_name=name)
        model.unet.enable_adapters()  # earlier subjects' adapters stay loaded but inactive
        model.unet.set_adapter(name)

    @staticmethod
    def state(model: DiffusionModel, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Adapter ``name`` in diffusers' LoRA format and its config (a dict)."""
        from diffusers.utils import convert_state_dict_to_diffusers

        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model.unet, adapter_name=name))
        return state, model.unet.peft_config[name].to_dict()

    @staticmethod
    def write(folder: Path, state: dict[str, torch.Tensor], config: dict[str, Any], sdxl: bool = False) -> None:
        """Write with the model's own pipeline's LoRA saver: ``StableDiffusionXLPipeline``'s
        (``StableDiffusionXLLoraLoaderMixin``) for SDXL, so that its ``load_lora_weights`` reads the file, else
        ``StableDiffusionPipeline``'s."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        pipeline.save_lora_weights(folder, unet_lora_layers=state, safe_serialization=True,
                                   unet_lora_adapter_metadata=config)

    def save(self, model: DiffusionModel, name: str, folder: Path) -> None:
        self.write(folder, *self.state(model, name), sdxl=is_sdxl(model))

    def reload(self, model: DiffusionModel, name: str, folder: Path) -> None:
        model.unet.delete_adapters(name)
        model.pipeline.load_lora_weights(str(folder), weight_name=LORA_FILE, adapter_name=name)

    def select(self, model: DiffusionModel, name: str | None) -> None:
        if name is None:
            model.pipeline.disable_lora()
        else:
            model.pipeline.enable_lora()
            model.pipeline.set_adapters([name])


class PeftFile:
    """Any peft tuner through peft's own model wrapper and adapter folder (see the module's docstring)."""

    saves = f"<subject>/{PEFT_CONFIG_FILE} + {PEFT_WEIGHTS_FILE} (peft's adapter format)"

    def __init__(self) -> None:
        self.peft_model: Any = None  # peft.PeftModel around the run's UNet, made at the first subject

    def inject(self, model: DiffusionModel, config: PeftConfig, name: str) -> None:
        from peft import get_peft_model

        if self.peft_model is None or self.peft_model.base_model.model is not model.unet:
            self.peft_model = get_peft_model(model.unet, config, adapter_name=name)
        else:
            self.peft_model.add_adapter(name, config)
        self.select(model, name)

    def save(self, model: DiffusionModel, name: str, folder: Path) -> None:
        with quiet_projection_warnings():
            save_peft_adapter(self.peft_model, name, folder)

    def reload(self, model: DiffusionModel, name: str, folder: Path) -> None:
        """The trained adapter's values replaced by the saved file's, through peft's loader (``load_peft_weights``,
        ``set_peft_model_state_dict``). Not delete-and-inject: peft cannot re-add a VeRA adapter once the last one
        is deleted (its shared projections go with it)."""
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        with quiet_projection_warnings():
            state = load_peft_weights(str(folder))
            result = set_peft_model_state_dict(self.peft_model, state, adapter_name=name)
        prefix = self.peft_model.base_model.prefix
        missing = [k for k in result.missing_keys if prefix in k and name in k.split(".")]
        if result.unexpected_keys or missing:
            raise BenchError(f"{folder / PEFT_WEIGHTS_FILE} does not match the adapter it was saved from: "
                             f"{len(result.unexpected_keys)} unexpected and {len(missing)} missing tensors")

    def select(self, model: DiffusionModel, name: str | None) -> None:
        tuner = self.peft_model.base_model
        if name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.enable_adapter_layers()
            tuner.set_adapter(name)


def save_peft_adapter(peft_model: Any, name: str, folder: Path) -> None:
    """What ``PeftModel.save_pretrained`` writes for one adapter, into ``folder`` itself (``save_pretrained`` puts a
    non-default adapter in a subfolder and adds a model card): the adapter's tensors and its config (inference
    mode, sets as sorted lists so the file's bytes do not depend on the process's string hashing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / PEFT_WEIGHTS_FILE),
              metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[name])
    config.inference_mode = True
    values = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    (folder / PEFT_CONFIG_FILE).write_text(json.dumps(values, indent=2, sort_keys=True, default=str) + "\n")


def load_peft_adapter(pipeline: Any, folder: Path) -> Any:
    """Load a saved subject (the folder is named after it) into a ``StableDiffusionPipeline``'s UNet, active.

    Returns the ``PeftModel`` around the pipeline's UNet (modified in place); its ``load_adapter(folder,
    adapter_name=...)`` and ``set_adapter`` add and switch further subjects.
    """
    from peft import PeftModel

    with quiet_projection_warnings():
        return PeftModel.from_pretrained(pipeline.unet, str(folder), adapter_name=f"subject_{Path(folder).name}")


class PeftAdapterMethod(PersonalizationMethod):
    """Base of the peft adapters; a paper's subclass gives ``Args`` (an ``AdapterArgs``), ``config()``, the card and
    the claims, and ``adapter_file`` when its format is not peft's own."""

    Args: ClassVar[type] = AdapterArgs
    adapter_file: ClassVar[type] = PeftFile
    saves = PeftFile.saves

    def __init__(self, args: Any):
        super().__init__(args)
        self.folders: dict[str, Path] = {}
        self.adapters = self.adapter_file()

    def config(self) -> PeftConfig:
        """The paper's peft config for one subject's adapter."""
        raise NotImplementedError

    def phrase(self, subject: Subject) -> str:
        return f"{self.args.identifier} {subject.class_noun}"

    def setup(self, model: DiffusionModel, subjects: Sequence[Subject]) -> None:
        check_identifier(model, self.args.identifier)

    def inject(self, model: DiffusionModel, name: str) -> list[torch.nn.Parameter]:
        """Add adapter ``name`` (seeded by ``train_seed``), make it the active one and return its parameters."""
        with torch.random.fork_rng(devices=[]), quiet_projection_warnings():
            torch.manual_seed(self.args.train_seed)
            self.adapters.inject(model, self.config(), name)
        return adapter_parameters(model.unet, name)

    def trainable(self, model: DiffusionModel, subject: Subject) -> list[torch.nn.Parameter]:
        params = self.inject(model, adapter_name(subject))
        for p in params:
            p.requires_grad_(True)
        return params

    def finish(self, model: DiffusionModel, subject: Subject, folder: Path) -> None:
        name = adapter_name(subject)
        self.adapters.save(model, name, folder)
        self.adapters.reload(model, name, folder)  # generation uses the saved file
        self.adapters.select(model, None)
        self.folders[subject.name] = folder

    @contextlib.contextmanager
    def activate(self, model: DiffusionModel, subject: Subject | None) -> Iterator[None]:
        if subject is None:
            yield
            return
        self.adapters.select(model, adapter_name(subject))
        try:
            yield
        finally:
            self.adapters.select(model, None)
