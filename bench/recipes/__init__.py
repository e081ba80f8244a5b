"""Embedded training recipes that sit above the runtime world (`bench embedded train NAME`).

They draw the data with the runtime (samplers, losses, the feature network's heads); the world they train
(bench.embedded) never imports them. Recipes of models that need nothing above the world stay in their
own module (bench.embedded.pixel_ddpm, feature_net, eval_clip, noisy_classifier, tokenizer).
"""
