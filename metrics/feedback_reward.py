"""The feedback world's rewards on a run's samples: the learned reward model and the simulated human.

Two of the alignment table's rewards (the others: CLIP score, attribute accuracy, FID/KID), each
per image and averaged over the run:

- ``reward``: the learned reward model's P(approved) (``bench.embedded.feedback.RewardNet``), the
  proxy that reward-weighted fine-tuning and DDPO optimize;
- ``human_approval``: the simulated human's verdict (``bench.embedded.feedback.judge``: count,
  colors left to right, background, from the pixels), the "human evaluation" of Lee et al.; with
  ``human_count``, ``human_color`` and ``human_background`` per attribute.

A gap between ``reward`` and ``human_approval`` after fine-tuning is reward over-optimization.

- ``feedback_accuracy``: the evaluation's own judge, the feature network's attribute heads, on the
  attributes the feedback judged (count, colors left to right, background; not shape, which no
  feedback speaks of): the fraction of samples with all of them right. The held-out accuracy of the
  alignment claims (``attr_acc_all`` of attribute-accuracy adds shape).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bench.alignment import FeedbackReward, feedback_hits
from bench.embedded.feature_extractor import load_network
from bench.embedded.feedback import JUDGED, MIN_ALPHA, MIN_AREA, judge
from bench.errors import BenchError
from bench.extractors import shapes_digest
from bench.interfaces import Metric, ReferenceSet
from bench.outputs import Output
from metrics.attribute_accuracy import BATCH, network_folder, predict

KEY_REWARD = "reward"
KEY_HUMAN = "human_approval"
KEY_ACCURACY = "feedback_accuracy"
REWARD_BATCH = 512  # bench.alignment.FeedbackReward scores 512 images at a time: the metric reads chunks of as many


class FeedbackRewardMetric(Metric):
    name = "feedback-reward"
    summary = ("the feedback world's rewards: the learned reward model's mean P(approved), the simulated human's approval, "
               "the feature network's accuracy on the judged attributes")
    outputs = (
        Output(KEY_REWARD, "reward model P(approved)", "higher", ".3f", "feedback-reward"),
        Output(KEY_HUMAN, "simulated human approval", "higher", ".3f", "feedback-reward"),
        Output("human_*", "simulated human, per attribute", "higher", ".3f", "feedback-reward"),
        Output(KEY_ACCURACY, "feedback accuracy (shapes-cnn32 heads)", "higher", ".3f", "feedback-reward"),
    )
    needs_prompts = True
    needs_targets = True

    def check(self, spec, reference: ReferenceSet) -> None:
        if reference.feature_extractor != "shapes-cnn32":
            raise BenchError(f"feedback-reward scores the embedded text-to-image world (shapes32 data sets), not "
                             f"{reference.name}")

        FeedbackReward()  # missing weights: one line before any sampling

    def protocol(self, spec, reference: ReferenceSet) -> dict[str, Any]:
        return {
            "reward_model": FeedbackReward().identity(),
            "human": {"judge": "bench.embedded.feedback.judge (pixels and the renderer's palette, no network)",
                      "judged": list(JUDGED), "min_alpha": MIN_ALPHA, "min_area": MIN_AREA},
            "targets": "the prompt's attributes",
            "feedback_accuracy": {"classifier": "shapes-cnn32 attribute heads", "classifier_digest": _digest(),
                                  "checked": ["count", "colors left to right", "background"]},
        }

    def compute(self, ctx) -> dict[str, float]:
        if not ctx.prompts or ctx.targets is None:
            raise BenchError("feedback-reward: this run has no prompts with targets")
        prompts, targets = list(ctx.prompts), list(ctx.targets)
        reward = FeedbackReward()
        # three passes over the samples, a chunk at a time, each chunk the batch of the network it feeds (the
        # reward model's 512, the classifier's BATCH; the judge is per image): the same bytes as on one array
        rewards = ctx.map_samples(lambda a, chunk: reward(chunk, prompts[a : a + len(chunk)]), REWARD_BATCH)
        verdict = ctx.map_samples(lambda a, chunk: judge(chunk.permute(0, 2, 3, 1).numpy(),
                                                         targets[a : a + len(chunk)]), REWARD_BATCH)
        values = {KEY_REWARD: float(rewards.mean()), KEY_HUMAN: float(np.mean(verdict["label"]))}
        values.update({f"human_{a}": float(np.mean(verdict[a])) for a in JUDGED})
        net = load_network(network_folder(ctx.reference))
        predicted = ctx.map_samples(lambda _, chunk: predict(net, chunk), BATCH)
        values[KEY_ACCURACY] = float(np.mean(feedback_hits(predicted, ctx.targets)))
        return values


def _digest() -> str:
    return shapes_digest("feature-net32")
