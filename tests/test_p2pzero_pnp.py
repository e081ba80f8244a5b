"""pix2pix-zero and Plug-and-Play on a tiny random StableDiffusionPipeline: identity cases that reduce to existing
adapters exactly, the regularization against the pipeline's formula, batching independence, bad input."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from bench.denoiser import CountingDenoiser, sample_seed
from bench.editing import EmbeddedEdits
from bench.errors import BenchError
from bench.interfaces import Batch
from bench.models import load_model
from tests.tiny_t2i import save_tiny_t2i

STEPS = 4


def method(name, **args):
    from bench.catalog import METHODS

    cls = METHODS.get(name)
    return cls(cls.parse_args(args))


def edit(model, m, items, steps=STEPS, seeds=None):
    seeds = seeds or [sample_seed(0, i) for i in range(len(items))]
    denoiser = CountingDenoiser(model.unet, torch.device("cpu"))
    return m.generate(model, Batch(tuple(seeds), steps, edits=tuple(items)), denoiser), denoiser


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(str(save_tiny_t2i(tmp_path_factory.mktemp("tiny-t2i"))))


@pytest.fixture(scope="module")
def items():
    return EmbeddedEdits().edits(2)


def same_prompt(items):
    return [dataclasses.replace(it, target_prompt=it.source_prompt, blend_words=(it.blend_words[0],) * 2) for it in items]


# -- Plug-and-Play -----------------------------------------------------------------------------------------------------
def test_pnp_without_injection_is_ddim_inversion_then_the_target_prompt(tiny, items):
    """Injection fractions 0: DDIM inversion with the source prompt, guided DDIM with the target prompt, which is
    SDEdit at strength 1 with DDIM inversion (an existing code path)."""
    pnp = method("pnp", feature_injection=0.0, attention_injection=0.0, source_text="source", guidance=4.0)
    sdedit = method("sdedit", strength=1.0, inversion="ddim", guidance=4.0)
    a, _ = edit(tiny, pnp, items)
    b, _ = edit(tiny, sdedit, items)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_pnp_with_the_source_prompt_is_the_reconstruction(tiny, items):
    """Target = source, source branch with the source prompt and no guidance: every injection copies the target's
    own features, so the output is the DDIM inversion's reconstruction."""
    pnp = method("pnp", source_text="source", guidance=1.0, feature_injection=1.0, attention_injection=1.0)
    a, _ = edit(tiny, pnp, same_prompt(items))
    b, _ = edit(tiny, method("ddim-inversion", guidance=1.0), items)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def test_pnp_injection_changes_the_edit_and_hooks_are_removed(tiny, items):
    before = {k: type(v) for k, v in tiny.unet.attn_processors.items()}
    on, _ = edit(tiny, method("pnp"), items)
    off, _ = edit(tiny, method("pnp", feature_injection=0.0, attention_injection=0.0), items)
    only_attention, _ = edit(tiny, method("pnp", feature_injection=0.0), items)
    assert (on - off).abs().max() > 1e-3 and (only_attention - off).abs().max() > 1e-5
    assert {k: type(v) for k, v in tiny.unet.attn_processors.items()} == before
    assert not any(m._forward_hooks for m in tiny.unet.modules())


def test_pnp_layers_follow_pnp_diffusers_mapping(tiny):
    from methods.pnp import feature_index, injected_attention

    # the tiny UNet: two CrossAttnUpBlock2D; the first up-block with attention is 0
    assert feature_index(tiny.unet, "auto") == (0, 1)
    layers = injected_attention(tiny.unet)
    assert layers and all(".attn1." in n and n.startswith("up_blocks.") for n in layers)
    assert not any(n.startswith("up_blocks.0.attentions.0.") for n in layers)
    assert any(n.startswith("up_blocks.0.attentions.1.") for n in layers)

    class SD:  # SD 1.x's decoder layout: UpBlock2D, then three CrossAttnUpBlock2D
        up_blocks = [type("B", (), {"resnets": [0] * 3})()] + [type("B", (), {"resnets": [0] * 3, "attentions": [0] * 3})()
                                                                for _ in range(3)]
        attn_processors = {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn{k}.processor": None
                           for b in (1, 2, 3) for a in (0, 1, 2) for k in (1, 2)}

    assert feature_index(SD, "auto") == (1, 1)  # pnp-diffusers' up_blocks[1].resnets[1]
    expected = {1: [1, 2], 2: [0, 1, 2], 3: [0, 1, 2]}  # pnp-diffusers' res_dict
    assert injected_attention(SD) == {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor"
                                      for b, blocks in expected.items() for a in blocks}


# -- pix2pix-zero ------------------------------------------------------------------------------------------------------
def test_pix2pix_zero_without_direction_or_guidance_is_the_reconstruction(tiny, items):
    """Δc = 0 (the same word on both sides), no cross-attention guidance, no regularization: DDIM inversion with the
    source prompt and guided DDIM with it, i.e. the ddim-inversion adapter."""
    p2pz = method("pix2pix-zero", xattn_guidance=0.0, regularize=False, guidance=3.0)
    a, _ = edit(tiny, p2pz, same_prompt(items))
    b, _ = edit(tiny, method("ddim-inversion", guidance=3.0), items)
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def _pipeline_auto_corr_loss(hidden_states, generator):
    """StableDiffusionPix2PixZeroPipeline.auto_corr_loss (diffusers 0.2x), written out for the test."""
    reg_loss = 0.0
    for i in range(hidden_states.shape[0]):
        for j in range(hidden_states.shape[1]):
            noise = hidden_states[i : i + 1, j : j + 1, :, :]
            while True:
                roll_amount = torch.randint(noise.shape[2] // 2, (1,), generator=generator).item()
                reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=2)).mean() ** 2
                reg_loss += (noise * torch.roll(noise, shifts=roll_amount, dims=3)).mean() ** 2
                if noise.shape[2] <= 8:
                    break
                noise = F.avg_pool2d(noise, kernel_size=2)
    return reg_loss


def _pipeline_regularize(noise_pred, generator, lambda_ac=20.0, lambda_kl=20.0, reg_steps=5, rolls=5):
    """The regularization loop of the pipeline's ``invert`` (one sample)."""
    with torch.enable_grad():
        for _ in range(reg_steps):
            for _ in range(rolls):
                var = noise_pred.detach().clone().requires_grad_(True)
                _pipeline_auto_corr_loss(var, generator).backward()
                noise_pred = noise_pred - lambda_ac * var.grad.detach() / rolls
            var = noise_pred.detach().clone().requires_grad_(True)
            mean, v = var.mean(), var.var()
            (v + mean**2 - 1 - torch.log(v + 1e-7)).backward()
            noise_pred = noise_pred - lambda_kl * var.grad.detach()
            noise_pred = noise_pred.detach()
    return noise_pred


@pytest.mark.parametrize("side", [8, 16])
def test_regularization_is_the_pipelines_per_sample(side):
    from methods.pix2pix_zero import regularize_noise

    eps = torch.randn(2, 4, side, side, generator=torch.Generator().manual_seed(3)) * 1.3 + 0.2
    ours = regularize_noise(eps, [torch.Generator().manual_seed(s) for s in (11, 12)], 20.0, 20.0, 5, 5)
    for i, seed in enumerate((11, 12)):
        ref = _pipeline_regularize(eps[i : i + 1], torch.Generator().manual_seed(seed))
        assert torch.allclose(ours[i : i + 1], ref, atol=1e-5), (ours[i : i + 1] - ref).abs().max()
    assert (ours - eps).abs().max() > 1e-3


def test_direction_sentences_are_the_worlds_captions():
    from methods.pix2pix_zero import direction_sentences

    red, blue = direction_sentences("red"), direction_sentences("blue")
    assert len(red) == len(blue) == 2 * 3 * 4 and all(" red " in s for s in red)
    assert [s.replace(" red ", " blue ") for s in red] == blue
    assert all("navy background" in s for s in direction_sentences("navy"))
    assert direction_sentences("cat")[0] == "a cat" and direction_sentences("red") == red


def test_pix2pix_zero_guidance_and_direction_act(tiny, items):
    # the tiny random text encoder's maps hardly move: a large rate makes the guidance visible
    full, d = edit(tiny, method("pix2pix-zero", regularize=False, xattn_guidance=100.0), items)
    no_xattn, d0 = edit(tiny, method("pix2pix-zero", regularize=False, xattn_guidance=0.0), items)
    assert (full - no_xattn).abs().max() > 1e-4
    assert d.calls == d0.calls + 2 * STEPS  # the reference pass and the gradient call per step


# -- both: batching, bad input ----------------------------------------------------------------------------------------
# the tiny UNet's noise estimates are ~50x a real one's (tests/tiny_t2i.py): the regularization at weight 20 diverges
SMALL_REG = {"reg_steps": 1, "lambda_ac": 1e-3, "lambda_kl": 1e-3}


@pytest.mark.parametrize("name,args", [("pnp", {}), ("pnp", {"source_latents": "inverted"}), ("pix2pix-zero", SMALL_REG)])
def test_edit_i_depends_on_item_i_alone(tiny, items, name, args):
    m = method(name, **args)
    seeds = [sample_seed(0, i) for i in range(len(items))]
    both, _ = edit(tiny, m, items, seeds=seeds)
    alone, _ = edit(tiny, m, items[1:2], seeds=seeds[1:2])
    assert torch.allclose(both[1:2], alone, atol=1e-4), (both[1:2] - alone).abs().max()


def test_bad_options_and_inputs_are_one_line(tiny, items):
    from bench.catalog import METHODS

    for name, args, match in [("pnp", {"feature_injection": 1.5}, "--feature-injection"),
                              ("pnp", {"attention_injection": -0.1}, "--attention-injection"),
                              ("pnp", {"source_text": "target"}, "--source-text"),
                              ("pnp", {"source_latents": "x"}, "--source-latents"),
                              ("pnp", {"feature_layer": "up"}, "--feature-layer"),
                              ("pix2pix-zero", {"xattn_guidance": -1}, "--xattn-guidance"),
                              ("pix2pix-zero", {"reg_steps": 1.5}, "--reg-steps"),
                              ("pix2pix-zero", {"ac_rolls": 0}, "--ac-rolls"),
                              ("pix2pix-zero", {"inversion": "ddim"}, "no option inversion")]:
        with pytest.raises(BenchError, match=match) as info:
            METHODS.get(name).parse_args(args)
        assert "\n" not in str(info.value)
    with pytest.raises(BenchError, match="no up_blocks\\[5\\]"):
        method("pnp", feature_layer="5.1").check(tiny, 10)
    no_words = [dataclasses.replace(items[0], blend_words=("", ""))]
    with pytest.raises(BenchError, match="source and target word"):
        edit(tiny, method("pix2pix-zero"), no_words)


class _PipelineProcessor:
    """StableDiffusionPix2PixZeroPipeline's Pix2PixZeroAttnProcessor (diffusers 0.2x), written out for the test."""

    def __init__(self, is_pix2pix_zero):
        self.is_pix2pix_zero, self.reference = is_pix2pix_zero, {}

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, timestep=None, loss=None):
        query = attn.to_q(hidden_states)
        encoder_hidden_states = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, None)
        if self.is_pix2pix_zero and timestep is not None:
            if loss is None:
                self.reference[timestep.item()] = probs.detach()
            else:
                loss.append(((probs - self.reference.pop(timestep.item())) ** 2).sum((1, 2)).mean(0))
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        return attn.to_out[1](attn.to_out[0](out))


def test_pix2pix_zero_edit_is_the_pipelines_for_one_image(tiny, items):
    """One edit: the reference pass and the cross-attention-guided pass of the pipeline's ``__call__`` (written out
    with its attention processor, loss and SGD step) from the same inverted latent, against the adapter."""
    steps, scale, rate = 3, 3.0, 100.0
    m = method("pix2pix-zero", regularize=False, guidance=scale, xattn_guidance=rate)
    ours, _ = edit(tiny, m, items[:1], steps)
    unet = tiny.unet
    with torch.no_grad():
        z0 = m.encode_images(tiny, items[:1])
        cond, uncond = m.encode_text(tiny, [items[0].source_prompt])
        delta = m.directions(tiny, items[:1])
        scheduler = m.make_scheduler(tiny)
        timesteps = m.editing_timesteps(scheduler, steps, 1.0)
        latents_init = m.ddim_inversion(tiny, CountingDenoiser(unet, torch.device("cpu")), z0, cond, steps, timesteps)[0]
    embeds, embeds_edit = torch.cat([uncond, cond]), torch.cat([uncond, cond + delta])
    saved = dict(unet.attn_processors)
    unet.set_attn_processor({n: _PipelineProcessor(".attn2." in n) for n in saved})
    try:
        with torch.no_grad():
            latents = latents_init
            for t in timesteps:
                eps_u, eps_c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=embeds,
                                    cross_attention_kwargs={"timestep": t}).sample.chunk(2)
                latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, latents).prev_sample
        latents = latents_init
        for t in timesteps:
            x_in = torch.cat([latents] * 2).detach().clone().requires_grad_(True)
            opt = torch.optim.SGD([x_in], lr=rate)
            with torch.enable_grad():
                loss = []
                unet(x_in, t, encoder_hidden_states=embeds_edit, cross_attention_kwargs={"timestep": t, "loss": loss})
                sum(loss).backward()
                opt.step()
            with torch.no_grad():
                eps_u, eps_c = unet(x_in.detach(), t, encoder_hidden_states=embeds_edit,
                                    cross_attention_kwargs={"timestep": None}).sample.chunk(2)
                latents = scheduler.step(eps_u + scale * (eps_c - eps_u), t, x_in.detach().chunk(2)[0]).prev_sample
        unet.zero_grad(set_to_none=True)
        with torch.no_grad():
            ref = m.decode(tiny, latents)
    finally:
        unet.set_attn_processor(saved)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
