"""The built-in registry entries: name -> "module:attr". Listing them imports nothing.

A method's, metric's or data set's summary and paper are written once, on its class
(``summary``, ``paper``); a model's on its loader function's docstring. The registry
reads them from the source without importing it (bench.registry.static_metadata).
"""

from __future__ import annotations

from bench.registry import Registry

METHODS: Registry = Registry("method", "diffbench.methods", base="bench.interfaces:Method", targets={
    # -- samplers: one paper each
    "ddpm": "methods.ddpm:DDPM",
    "ddim": "methods.ddim:DDIM",
    "pndm": "methods.pndm:PNDM",
    "improved-ddpm": "methods.improved_ddpm:ImprovedDDPM",  # issue 15 (lead)
    "dpmsolver": "methods.dpm_solver:DPMSolver",
    "dpmsolver++": "methods.dpm_solver_pp:DPMSolverPP",
    "dpmsolver++-2s": "methods.dpm_solver_pp:DPMSolverPP2S",
    "dpmsolver++-sde": "methods.dpm_solver_pp:DPMSolverPPSDE",
    "unipc": "methods.unipc:UniPC",
    "euler": "methods.karras:Euler",
    "euler-ancestral": "methods.k_diffusion:EulerAncestral",
    "heun": "methods.karras:Heun",
    "lms": "methods.k_diffusion:LMS",
    "deis": "methods.deis:DEIS",
    "kdpm2": "methods.k_diffusion:KDPM2",
    # -- flow-matching samplers (issue 16): SD3 and FLUX
    "flow-euler": "methods.flow_euler:FlowEuler",
    "flow-heun": "methods.flow_heun:FlowHeun",
    "flow-dpmsolver++": "methods.flow_dpm_solver_pp:FlowDPMSolverPP",
    "flow-unipc": "methods.flow_unipc:FlowUniPC",
    # -- text-to-image guidance
    "cfg": "methods.cfg:CFG",
    "cfg-rescale": "methods.cfg_rescale:CFGRescale",
    "freeu": "methods.freeu:FreeU",
    "classifier-guidance": "methods.classifier_guidance:ClassifierGuidance",
    # -- image editing (issue 7)
    "sdedit": "methods.sdedit:SDEdit",
    "ddim-inversion": "methods.inversion:DDIMInversion",
    "null-text-inversion": "methods.inversion:NullTextInversion",
    "p2p": "methods.p2p:PromptToPrompt",
    "diffedit": "methods.diffedit:DiffEdit",
    "pix2pix-zero": "methods.pix2pix_zero:Pix2PixZero",
    "pnp": "methods.pnp:PlugAndPlay",
    "asyrp": "methods.asyrp:Asyrp",
    "edict": "methods.edict:EDICT",
    "edict-inversion": "methods.edict:EDICTInversion",
    "blended-latent": "methods.blended_latent:BlendedLatent",
    # -- image restoration (issue 17)
    "ddnm": "methods.ddnm:DDNM",
    "pseudo-inverse": "methods.ddnm:PseudoInverse",
    # -- personalization (issue 8): methods that train in prepare()
    "textual-inversion": "methods.textual_inversion:TextualInversion",
    "dreambooth": "methods.dreambooth:DreamBooth",
    "lora": "methods.lora:LoRA",
    "custom-diffusion": "methods.custom_diffusion:CustomDiffusion",
    "vera": "methods.vera:VeRA",  # issue 19: the peft family
    "loha": "methods.lycoris:LoHa",
    "lokr": "methods.lycoris:LoKr",
    # -- personalization without test-time fine-tuning (issue 19): encoders trained once
    "instantbooth": "methods.instantbooth:InstantBoothMethod",
    "hyperdreambooth": "methods.hyperdreambooth:HyperDreamBooth",
    "celeb-basis": "methods.celeb_basis:CelebBasis",
    "magicapture": "methods.magicapture:MagiCapture",
    # -- alignment (issue 9): fine-tuning from feedback in prepare()
    "reward-weighted": "methods.reward_weighted:RewardWeighted",
    "ddpo": "methods.ddpo:DDPO",
    "diffusion-dpo": "methods.diffusion_dpo:DiffusionDPO",
    "dpok": "methods.dpok:DPOK",
    "parrot": "methods.parrot:Parrot",
    # -- few-step students (issue 14): each samples the students its paper's recipe distils
    "progressive-distillation": "methods.progressive_distillation:ProgressiveDistillation",
    "consistency": "methods.consistency:Consistency",
    "guided-distillation": "methods.guided_distillation:GuidedDistillation",
    "lcm": "methods.lcm:LCM",
    "lcm-lora": "methods.lcm:LCMLoRA",
    # issue 15: edm (Karras et al. 2022's sampler in full; Chen 2023's noise scheduling)
    "edm": "methods.edm:EDM",
    "noise-scheduling": "methods.noise_scheduling:NoiseScheduling",
    # issue 15: ldm (latent against pixel diffusion at equal training FLOPs; CLD for gDDIM)
    "latent-diffusion": "methods.latent_diffusion:LatentDiffusion",
    "gddim": "methods.gddim:GDDIM",
    # issue 15: score-sde (Song et al. 2021's samplers, Song and Ermon 2019's annealed Langevin dynamics)
    "probability-flow": "methods.probability_flow:ProbabilityFlow",
    "score-sde": "methods.score_sde:ScoreSDE",
    "ncsn": "methods.ncsn:NCSN",
    # issue 18 (controlnet)
    "controlnet": "methods.controlnet:ControlNet",
    # issue 18 (ip2p): InstructPix2Pix (an instruction-following editor trained on rendered edits)
    "instruct-pix2pix": "methods.instruct_pix2pix:InstructPix2Pix",
    # issue 18 (imagic)
    "imagic": "methods.imagic:Imagic",
    # issue 18 (diffusionclip)
    "diffusionclip": "methods.diffusionclip:DiffusionCLIP",
    # issue 18 (pbe): exemplar-guided inpainting (Yang et al. 2023)
    "paint-by-example": "methods.paint_by_example:PaintByExample",
})

METRICS: Registry = Registry("metric", "diffbench.metrics", base="bench.interfaces:Metric", targets={
    "fid": "metrics.fidelity:FID",
    "kid": "metrics.fidelity:KID",
    "latency": "metrics.latency:Latency",
    "brightness": "metrics.brightness:Brightness",
    "memory": "metrics.latency:Memory",
    "clip-score": "metrics.clip_score:CLIPScore",
    "attribute-accuracy": "metrics.attribute_accuracy:AttributeAccuracy",
    "clip-i": "metrics.personalization:CLIPI",
    "clip-t": "metrics.personalization:CLIPT",
    "dino": "metrics.personalization:DINO",
    "edit-background": "metrics.editing:EditBackground",
    "edit-structure": "metrics.editing:EditStructure",
    "edit-clip": "metrics.editing:EditCLIP",
    "edit-ground-truth": "metrics.editing:EditGroundTruth",
    "reconstruction": "metrics.editing:ReconstructionError",
    "feedback-reward": "metrics.feedback_reward:FeedbackRewardMetric",
    "restoration": "metrics.restoration:Restoration",
    # -- SDXL micro-conditioning (issue 16): crop -> cut-off objects, original size -> sharpness
    "cutoff": "metrics.microconditioning:Cutoff",
    "sharpness": "metrics.microconditioning:Sharpness",
    # issue 15: score-sde (the likelihood through the probability-flow ODE)
    "nll-bpd": "metrics.likelihood:NLLBitsPerDim",
    # issue 18 (controlnet)
    "control-iou": "metrics.control:ControlIoU",
})

DATASETS: Registry = Registry("dataset", "diffbench.datasets", base="bench.interfaces:ReferenceSet", targets={
    "shapes16": "bench.datasets:Shapes16",
    "cifar10": "bench.datasets:Cifar10Train",
    "shapes32": "bench.datasets:Shapes32",
    "coco2014-captions": "bench.datasets:Coco2014Captions",
    "partiprompts": "bench.datasets:PartiPrompts",
    "drawbench": "bench.datasets:DrawBench",
    "prompt-file": "bench.datasets:PromptFile",
    "embedded-edits": "bench.editing:EmbeddedEdits",
    "pie-bench": "bench.editing:PIEBench",
    "embedded-recolor16": "bench.attribute_edits:EmbeddedRecolor16",
    "embedded-concepts": "bench.personalization:EmbeddedConcepts",
    "dreambench": "bench.personalization:DreamBench",
    "embedded-composition": "bench.personalization:EmbeddedComposition",
    "shapes32-heldout": "bench.alignment:HeldoutPrompts",
    "embedded-restoration": "bench.restoration:EmbeddedRestoration",
    "embedded-restoration-inpainting": "bench.restoration:RestorationInpainting",
    "embedded-restoration-sr4": "bench.restoration:RestorationSR4",
    "embedded-restoration-colorization": "bench.restoration:RestorationColorization",
    # issue 18 (controlnet)
    "embedded-controls": "bench.controls:EmbeddedControls",
    # issue 18 (diffusionclip)
    "embedded-recolor32": "bench.attribute_edits:EmbeddedRecolor32",
    # issue 18 (pbe): Paint-by-Example's exemplars
    "embedded-exemplars": "bench.exemplars:EmbeddedExemplars",
})

MODELS: Registry = Registry("model", "diffbench.models", targets={
    "embedded-ddpm": "bench.models:embedded_pixel_ddpm",
    "embedded-ddpm-zsnr": "bench.models:embedded_pixel_ddpm_zsnr",
    # few-step students of embedded-ddpm (issue 14)
    "embedded-pd-4": "bench.models:embedded_pd_4",
    "embedded-pd-2": "bench.models:embedded_pd_2",
    "embedded-pd-1": "bench.models:embedded_pd_1",
    "embedded-cd": "bench.models:embedded_cd",
    # issue 15 (lead): the score-based pixel variants
    "embedded-ncsn": "bench.models:embedded_ncsn",
    "embedded-iddpm": "bench.models:embedded_iddpm",
    "embedded-iddpm-linear": "bench.models:embedded_iddpm_linear",
    "google/ncsnpp-celebahq-256": "bench.models:ncsnpp_celebahq_256",
    "google/ddpm-cifar10-32": "bench.models:ddpm_cifar10",
    "openai/diffusers-cd_imagenet64_l2": "bench.models:cd_imagenet64_l2",
    "embedded-t2i": "bench.models:embedded_t2i",
    "embedded-guided-distillation": "bench.models:embedded_guided_distillation",
    "embedded-guided-distillation-4": "bench.models:embedded_guided_distillation_4",
    "embedded-sdxl": "bench.models:embedded_sdxl",
    "embedded-flow": "bench.models:embedded_flow",
    "embedded-flow-reflow": "bench.models:embedded_flow_reflow",
    "embedded-flow-uniform": "bench.models:embedded_flow_uniform",
    "embedded-lcm": "bench.models:embedded_lcm",  # issue 14: embedded-t2i's latent consistency model
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "bench.models:stable_diffusion_v1_5",
    "stabilityai/stable-diffusion-xl-base-1.0": "bench.models:stable_diffusion_xl_base",
    "stabilityai/stable-diffusion-3-medium-diffusers": "bench.models:stable_diffusion_3_medium",
    "black-forest-labs/FLUX.1-schnell": "bench.models:flux1_schnell",
    "black-forest-labs/FLUX.1-dev": "bench.models:flux1_dev",
    # issue 15: edm (Chen 2023's noise scheduling at 32x32)
    "embedded-ddpm32": "bench.models:embedded_ddpm32",
    "embedded-ddpm32-shifted": "bench.models:embedded_ddpm32_shifted",
    # issue 15: ldm (latent against pixel diffusion at equal training FLOPs; CLD for gDDIM)
    "embedded-t2i-budget": "bench.models:embedded_t2i_budget",
    "embedded-pixel-t2i": "bench.models:embedded_pixel_t2i",
    "embedded-cld": "bench.models:embedded_cld",
    # issue 18 (ip2p): InstructPix2Pix (the embedded editor, and the public checkpoint through the same loader)
    "embedded-instruct-pix2pix": "bench.models:embedded_instruct_pix2pix",
    "timbrooks/instruct-pix2pix": "bench.models:instruct_pix2pix",
    # issue 18 (pbe): Paint-by-Example (a PaintByExamplePipeline folder)
    "embedded-paint-by-example": "bench.models:embedded_paint_by_example",
    "Fantasy-Studio/Paint-by-Example": "bench.models:paint_by_example_public",
})
