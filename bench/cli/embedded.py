"""`bench embedded`: train (reproduce) and inspect the embedded world's models."""

from __future__ import annotations

from pathlib import Path

from bench.cli.options import positive_int

TRAINABLE = {  # name: (module, recipe class, weights folder)
    "pixel-ddpm": ("bench.embedded.pixel_ddpm", "Recipe", "pixel-ddpm"),
    "pixel-ddpm-zsnr": ("bench.embedded.pixel_ddpm", "ZeroSNRRecipe", "pixel-ddpm-zsnr"),
    "feature-net": ("bench.embedded.feature_net", "Recipe", "feature-net"),
    # -- text-to-image world (32x32) --
    "tokenizer": ("bench.embedded.tokenizer", "Recipe", "t2i/tokenizer"),
    "feature-net32": ("bench.embedded.feature_net", "Recipe32", "feature-net32"),
    "eval-clip": ("bench.embedded.eval_clip", "Recipe", "eval-clip"),
    "t2i-vae": ("bench.recipes.t2i", "VaeRecipe", "t2i/vae"),
    "t2i-unet": ("bench.recipes.t2i", "UnetRecipe", "t2i"),  # the unet and the text encoder, jointly
    "noisy-classifier": ("bench.embedded.noisy_classifier", "Recipe", "noisy-classifier"),
    # -- alignment (issue 9): the base model's images, the simulated human's labels, the reward model --
    "feedback": ("bench.recipes.feedback", "Recipe", "feedback"),
    # -- personalization without test-time fine-tuning (issue 19): InstantBooth's encoders and adapters --
    "instantbooth": ("bench.recipes.instantbooth", "Recipe", "instantbooth"),
    # -- personalization (issue 19): HyperDreamBooth's pre-optimized LiDB weights and its HyperNetwork --
    "hyperdreambooth": ("bench.recipes.hyperdreambooth", "Recipe", "hyperdreambooth"),
    # -- today's families (issue 16): SDXL's micro-conditioning
    "sdxl": ("bench.recipes.sdxl", "Recipe", "sdxl"),
    # -- today's families (issue 16): an SD3-layout rectified flow (MMDiT), and its reflow (Liu et al. 2023)
    "flow": ("bench.recipes.flow", "Recipe", "flow"),
    "flow-reflow": ("bench.recipes.flow", "ReflowRecipe", "flow-reflow"),
    "flow-uniform": ("bench.recipes.flow", "UniformRecipe", "flow-uniform"),  # Esser et al.'s uniform-t baseline
    # -- few-step students (issue 14): of the pixel DDPM (--steps: updates per round for progressive distillation)
    "progressive-distillation": ("bench.recipes.distill", "PDRecipe", "progressive-distillation"),
    "consistency-distillation": ("bench.recipes.distill", "CDRecipe", "consistency-distillation"),
    "guided-distillation": ("bench.recipes.guided", "Recipe", "guided-distillation"),
    "guided-distillation-4": ("bench.recipes.guided", "ProgressiveRecipe", "guided-distillation-4"),
    # -- few-step students (issue 14): latent consistency distillation of embedded-t2i (Luo et al. 2023)
    "lcm": ("bench.recipes.lcm", "Recipe", "lcm"),
    "lcm-lora": ("bench.recipes.lcm", "LoraRecipe", "lcm-lora"),
    # issue 15: score-based pixel variants (NCSN / Score-SDE VE; Improved DDPM's learned variances and schedules)
    "ncsn": ("bench.recipes.score_models", "NcsnRecipe", "ncsn"),
    "iddpm": ("bench.recipes.score_models", "IddpmRecipe", "iddpm"),
    "iddpm-linear": ("bench.recipes.score_models", "IddpmLinearRecipe", "iddpm-linear"),
    # issue 15: edm (Chen 2023's noise scheduling at 32x32: the default schedule and the input-scaled one, b = 0.5)
    "pixel-ddpm32": ("bench.recipes.noise_scheduling", "Recipe32", "pixel-ddpm32"),
    "pixel-ddpm32-shifted": ("bench.recipes.noise_scheduling", "ShiftedRecipe32", "pixel-ddpm32-shifted"),
    # issue 15: ldm (latent against pixel diffusion at equal training FLOPs; CLD for gDDIM)
    "t2i-budget": ("bench.recipes.ldm", "BudgetRecipe", "t2i-budget"),
    "pixel-t2i": ("bench.recipes.ldm", "PixelRecipe", "pixel-t2i"),
    "cld": ("bench.recipes.cld", "Recipe", "cld"),
    # issue 18 (controlnet): a ControlNet of embedded-t2i conditioned on object masks
    "controlnet-mask": ("bench.recipes.controlnet", "Recipe", "controlnet-mask"),
    # issue 18 (ip2p): InstructPix2Pix, embedded-t2i fine-tuned on rendered instruction edits
    "instruct-pix2pix": ("bench.recipes.instruct_pix2pix", "Recipe", "instruct-pix2pix"),
    # issue 18 (diffusionclip): embedded-t2i's UNet fine-tuned red -> blue with the directional CLIP loss
    "diffusionclip-blue": ("bench.recipes.diffusionclip", "Recipe", "diffusionclip-blue"),
    # issue 18 (pbe): Paint-by-Example's PaintByExamplePipeline folder (the t2i UNet widened, the eval CLIP's tower)
    "paint-by-example": ("bench.recipes.paint_by_example", "Recipe", "paint-by-example"),
}


def add_parser(sub, argv: list[str]) -> None:
    p = sub.add_parser("embedded", help="train or inspect the embedded world's models",
                       description="The embedded shapes world: its models are trained by the project from seeds.")
    esub = p.add_subparsers(dest="embedded_command", metavar="ACTION")
    t = esub.add_parser("train", help="reproduce an embedded model from its recipe",
                        description="Train an embedded model from its committed recipe on this machine. "
                        "Writes the weights and RECIPE.json (with the measured wall time).")
    t.add_argument("name", choices=sorted(TRAINABLE))
    t.add_argument("--steps", type=positive_int, help="training steps (default: the recipe's)")
    t.add_argument("--out", help="output folder (default: the committed weights' folder, overwritten)")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=train)
    r = esub.add_parser("render", help="save a grid of rendered scenes with their captions")
    r.add_argument("--out", default="shapes-grid.png")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--resolution", type=positive_int, default=16)
    r.add_argument("--count", type=positive_int, default=64)
    r.set_defaults(func=render)


def train(args) -> int:
    import dataclasses
    import importlib
    import json

    from bench.models import EMBEDDED_WEIGHTS

    module_name, recipe_name, folder = TRAINABLE[args.name]
    module = importlib.import_module(module_name)
    recipe = getattr(module, recipe_name)()
    if args.steps is not None:
        recipe = dataclasses.replace(recipe, steps=args.steps)
    out = Path(args.out) if args.out else EMBEDDED_WEIGHTS / folder
    record = module.train(out, recipe, progress=not args.no_progress)
    print(json.dumps(record, indent=2))
    print(f"saved to {out}")
    return 0


def render(args) -> int:
    from bench.embedded.shapes import WorldConfig, render_set
    from bench.runner import save_grid

    images, scenes = render_set(args.seed, range(args.count), WorldConfig(args.resolution))
    save_grid(images, Path(args.out))
    for i, scene in enumerate(scenes[:8]):
        print(f"{i}: {scene.caption}")
    print(f"saved {args.count} scenes to {args.out}")
    return 0
