"""Tests for MGDE: identity at initialisation, top-k routing, expert initialisation and gradient flow."""

from __future__ import annotations

import warnings

import open_clip
import pytest
import torch
import torch.nn.functional as F

from capt_lib.modules.kmeans import kmeans
from capt_lib.modules.mgde import MGDE, MGDEConfig, MGDEOutput, load_balancing_loss, route_top_k

WIDTH = 32
CONTEXT_DIM = 8


@pytest.fixture(scope="module")
def clip_mlp():
    """The last ViT block's MLP of a tiny random open_clip CLIP, frozen as in the backbone."""
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=28, patch_size=7, width=WIDTH, layers=1, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
    )
    model.requires_grad_(False)
    return model.visual.transformer.resblocks[-1].mlp


@pytest.fixture(scope="module")
def semantic_features():
    return torch.randn(40, WIDTH, generator=torch.Generator().manual_seed(1))


def make_inputs(batch: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, WIDTH, generator=generator)
    context = torch.randn(batch, CONTEXT_DIM, generator=generator)
    return x, context


def build(config: MGDEConfig, semantic_features, clip_mlp, seed: int = 0) -> MGDE:
    torch.manual_seed(seed)
    return MGDE(config, WIDTH, CONTEXT_DIM, semantic_features, clip_mlp)


def perturb_zero_init(module: MGDE, seed: int = 3) -> None:
    """Give the zero-initialised up-projections and gates random values, so every expert contributes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for expert in module.semantic_experts:
            expert.up.weight.copy_(0.1 * torch.randn(expert.up.weight.shape, generator=generator))
            expert.up.bias.copy_(0.1 * torch.randn(expert.up.bias.shape, generator=generator))
        for expert in module.sample_experts:
            expert.gate.copy_(torch.randn(expert.gate.shape, generator=generator))


def slow_mgde(module: MGDE, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """MGDE written one sample at a time from the definition: x + sum over the top-k experts of r_e * expert_e(x)."""
    experts = list(module.semantic_experts) + list(module.sample_experts)
    outputs = []
    for sample, sample_context in zip(x, context):
        logits = module.router.weight @ torch.cat([sample, sample_context]) + module.router.bias
        probs = torch.softmax(logits, dim=0)
        chosen = sorted(range(len(experts)), key=lambda e: -probs[e].item())[: module.top_k]
        total = sum(probs[e] for e in chosen)

        out = sample.clone()
        for e in chosen:
            out = out + (probs[e] / total) * experts[e](sample.unsqueeze(0)).squeeze(0)
        outputs.append(out)
    return torch.stack(outputs)


def test_identity_at_init(semantic_features, clip_mlp):
    module = build(MGDEConfig(), semantic_features, clip_mlp)
    x, context = make_inputs(16)

    for mode in ("train", "eval"):
        module.train(mode == "train")
        out = module(x, context)
        assert torch.equal(out.output, x), f"MGDE is not the identity at init in {mode} mode"


def test_router_weights_sum_to_one(semantic_features, clip_mlp):
    config = MGDEConfig(n_semantic_experts=3, n_sample_experts=2, n_centres=4, top_k=2)
    module = build(config, semantic_features, clip_mlp)
    x, context = make_inputs(32)

    out = module(x, context)

    assert out.router_weights.shape == (32, 5)
    torch.testing.assert_close(out.router_weights.sum(dim=1), torch.ones(32))
    assert ((out.router_weights > 0).sum(dim=1) == 2).all()
    assert torch.equal(out.expert_mask, out.router_weights > 0)
    torch.testing.assert_close(out.router_probs.sum(dim=1), torch.ones(32))


def test_router_keeps_largest_probs(semantic_features, clip_mlp):
    config = MGDEConfig(n_semantic_experts=3, n_sample_experts=2, n_centres=4, top_k=2)
    module = build(config, semantic_features, clip_mlp)
    x, context = make_inputs(16)

    out = module(x, context)

    for probs, weights in zip(out.router_probs, out.router_weights):
        largest = sorted(range(5), key=lambda e: -probs[e].item())[:2]
        assert sorted(torch.nonzero(weights).flatten().tolist()) == sorted(largest)
        for e in largest:
            assert weights[e].item() == pytest.approx(probs[e].item() / (probs[largest[0]] + probs[largest[1]]).item())


def test_route_top_k_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])

    weights, mask = route_top_k(probs, 2)

    torch.testing.assert_close(weights, torch.tensor([[0.625, 0.375, 0.0], [0.0, 2 / 9, 7 / 9]]))
    assert mask.tolist() == [[True, True, False], [False, True, True]]


def test_sparse_mix_matches_slow_loop(semantic_features, clip_mlp):
    config = MGDEConfig(n_semantic_experts=2, n_sample_experts=2, n_centres=5, top_k=2)
    module = build(config, semantic_features, clip_mlp)
    perturb_zero_init(module)
    x, context = make_inputs(12)
    x_fast = x.clone().requires_grad_(True)
    x_slow = x.clone().requires_grad_(True)

    fast = module(x_fast, context).output
    fast.square().sum().backward()
    fast_grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    slow = slow_mgde(module, x_slow, context)
    slow.square().sum().backward()

    assert not torch.allclose(fast, x), "the experts contribute nothing, so the comparison is empty"
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fast.grad, x_slow.grad, rtol=1e-5, atol=1e-5)
    for name, param in module.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(fast_grads[name], param.grad, rtol=1e-5, atol=1e-5, msg=name)
        else:
            assert name not in fast_grads or fast_grads[name].abs().max() == 0, name


def test_gradient_reaches_every_parameter(semantic_features, clip_mlp):
    config = MGDEConfig(n_semantic_experts=2, n_sample_experts=1, n_centres=4, top_k=2)
    module = build(config, semantic_features, clip_mlp)
    optimiser = torch.optim.SGD(module.parameters(), lr=0.1)
    x, context = make_inputs(32)
    target = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(9))

    def step() -> dict[str, torch.Tensor]:
        optimiser.zero_grad(set_to_none=True)
        out = module(x, context)
        (out.output - target).square().mean().backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        optimiser.step()
        return grads

    assert module(x, context).expert_mask.any(dim=0).all(), "some expert gets no sample, so it cannot get a gradient"
    first = step()
    second = step()

    # Step 0: only the zero-initialised up-projections and gates can move, as in LoRA.
    for name, grad in first.items():
        moves_first = name.endswith(("up.weight", "up.bias", ".gate"))
        if moves_first:
            assert grad is not None and grad.abs().max() > 0, f"{name} got no gradient at step 0"
        else:
            assert grad is None or grad.abs().max() == 0, f"{name} got a gradient at step 0"
    for name, grad in second.items():
        assert grad is not None and grad.abs().max() > 0, f"{name} got no gradient after one step"


def test_semantic_rows_are_kmeans_centres(semantic_features, clip_mlp):
    config = MGDEConfig(n_semantic_experts=3, n_sample_experts=1, n_centres=4, kmeans_seed=5)
    module = build(config, semantic_features, clip_mlp)

    centres = kmeans(semantic_features, 12, seed=5, cosine=True).centres

    for e, expert in enumerate(module.semantic_experts):
        torch.testing.assert_close(expert.down.weight, centres[4 * e : 4 * (e + 1)], rtol=0, atol=0)
        assert torch.equal(expert.up.weight, torch.zeros(WIDTH, 4))


def test_sample_expert_copies_clip_mlp(semantic_features, clip_mlp):
    module = build(MGDEConfig(n_sample_experts=2), semantic_features, clip_mlp)
    clip_state = {name: p.clone() for name, p in clip_mlp.state_dict().items()}

    for expert in module.sample_experts:
        for name, param in expert.mlp.state_dict().items():
            assert torch.equal(param, clip_mlp.state_dict()[name]), name
            assert param.data_ptr() != clip_mlp.state_dict()[name].data_ptr(), f"{name} shares storage with CLIP"
        assert all(p.requires_grad for p in expert.mlp.parameters())

    with torch.no_grad():
        module.sample_experts[0].mlp.c_fc.weight.add_(1.0)
    for name, param in clip_mlp.state_dict().items():
        assert torch.equal(param, clip_state[name]), f"changing the expert changed CLIP's {name}"
    assert not any(p.requires_grad for p in clip_mlp.parameters()), "building MGDE unfroze CLIP's MLP"


def test_sample_expert_matches_mlp_output(semantic_features, clip_mlp):
    module = build(MGDEConfig(n_sample_experts=1), semantic_features, clip_mlp)
    x, _ = make_inputs(4)

    expert = module.sample_experts[0]
    with torch.no_grad():
        expert.gate.fill_(1.0)
    hidden = F.gelu(F.linear(x, clip_mlp.c_fc.weight, clip_mlp.c_fc.bias))
    expected = F.linear(hidden, clip_mlp.c_proj.weight, clip_mlp.c_proj.bias)

    torch.testing.assert_close(expert(x), expected)


def test_experts_none_is_identity(clip_mlp):
    module = MGDE(MGDEConfig(experts="none"), WIDTH, CONTEXT_DIM)
    x, context = make_inputs(6)

    out = module(x, context)

    assert isinstance(out, MGDEOutput)
    assert torch.equal(out.output, x)
    assert out.router_weights.shape == (6, 0)
    assert module.num_experts == 0
    assert list(module.parameters()) == []


def test_experts_semantic_only(semantic_features):
    module = build(MGDEConfig(n_semantic_experts=2, n_sample_experts=3, experts="semantic"), semantic_features, None)
    x, context = make_inputs(6)

    out = module(x, context)

    assert module.expert_names == ["semantic0", "semantic1"]
    assert len(module.sample_experts) == 0
    assert out.router_weights.shape == (6, 2)


def test_experts_sample_only(clip_mlp):
    module = build(MGDEConfig(n_semantic_experts=2, n_sample_experts=3, experts="sample"), None, clip_mlp)
    x, context = make_inputs(6)

    out = module(x, context)

    assert module.expert_names == ["sample0", "sample1", "sample2"]
    assert len(module.semantic_experts) == 0
    assert out.router_weights.shape == (6, 3)
    assert ((out.router_weights > 0).sum(dim=1) == 2).all()


def test_top_k_clamped_with_warning(clip_mlp):
    with pytest.warns(UserWarning, match="top_k=2 exceeds the 1 expert"):
        module = build(MGDEConfig(n_sample_experts=1, experts="sample"), None, clip_mlp)
    x, context = make_inputs(5)

    out = module(x, context)

    assert module.top_k == 1
    torch.testing.assert_close(out.router_weights, torch.ones(5, 1))


def test_no_context_router(semantic_features, clip_mlp):
    torch.manual_seed(0)
    module = MGDE(MGDEConfig(), WIDTH, 0, semantic_features, clip_mlp)
    x, _ = make_inputs(4)

    out = module(x)

    assert module.router.in_features == WIDTH
    torch.testing.assert_close(out.router_probs, torch.softmax(module.router(x), dim=1))


def test_router_noise_only_in_training(semantic_features, clip_mlp):
    noisy = build(MGDEConfig(router_noise=1.0), semantic_features, clip_mlp, seed=4)
    clean = build(MGDEConfig(router_noise=0.0), semantic_features, clip_mlp, seed=4)
    x, context = make_inputs(8)

    noisy.eval()
    clean.eval()
    assert torch.equal(noisy(x, context).router_probs, clean(x, context).router_probs)
    noisy.train()
    assert not torch.allclose(noisy(x, context).router_probs, clean(x, context).router_probs)


def test_load_balancing_loss_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    mask = torch.tensor([[True, False, False], [False, True, False]])

    loss = load_balancing_loss(probs, mask)
    loss.backward()

    # Slot shares f = (1/2, 1/2, 0), mean probabilities P = (0.4, 0.4, 0.2): 3 * (0.2 + 0.2).
    assert loss.item() == pytest.approx(1.2)
    # d loss / d probs[b, e] = n_experts * f_e / B.
    torch.testing.assert_close(probs.grad, torch.tensor([[0.75, 0.75, 0.0], [0.75, 0.75, 0.0]]))


def test_load_balancing_loss_bounds():
    uniform_probs = torch.full((4, 4), 0.25)
    balanced_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], dtype=torch.bool)
    collapsed_probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(4, 1)
    collapsed_mask = torch.tensor([[True, False, False, False]]).repeat(4, 1)

    assert load_balancing_loss(uniform_probs, balanced_mask).item() == pytest.approx(1.0)
    assert load_balancing_loss(collapsed_probs, collapsed_mask).item() == pytest.approx(4.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(experts="all"), "experts='all' is invalid"),
        (dict(n_semantic_experts=0), "needs n_semantic_experts >= 1"),
        (dict(n_sample_experts=0, experts="sample"), "needs n_sample_experts >= 1"),
        (dict(n_centres=0), "n_centres=0"),
        (dict(top_k=0), "top_k=0"),
        (dict(router_noise=-0.1), "router_noise=-0.1"),
    ],
)
def test_config_rejects_invalid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MGDEConfig(**kwargs)


def test_too_few_semantic_features(clip_mlp):
    features = torch.randn(10, WIDTH)

    with pytest.raises(ValueError, match=r"2 \* 8 = 16 K-means centres .* M=10"):
        build(MGDEConfig(n_semantic_experts=2, n_centres=8), features, clip_mlp)


def test_wrong_width_rejected(semantic_features, clip_mlp):
    with pytest.raises(ValueError, match=r"semantic_features must have shape \(M, width=32\)"):
        build(MGDEConfig(), torch.randn(40, 16), clip_mlp)
    with pytest.raises(ValueError, match="clip_mlp maps 32 -> 32 features, but width=64"):
        MGDE(MGDEConfig(experts="sample"), 64, 0, None, clip_mlp)


def test_missing_inputs_rejected(semantic_features, clip_mlp):
    module = build(MGDEConfig(), semantic_features, clip_mlp)
    x, context = make_inputs(3)

    with pytest.raises(ValueError, match="semantic_features"):
        build(MGDEConfig(), None, clip_mlp)
    with pytest.raises(ValueError, match="clip_mlp"):
        build(MGDEConfig(), semantic_features, None)
    with pytest.raises(ValueError, match="context is required"):
        module(x)
    with pytest.raises(ValueError, match=r"context of shape \(3, 8\)"):
        module(x, context[:, :4])


def test_no_warning_when_top_k_fits(semantic_features, clip_mlp):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build(MGDEConfig(), semantic_features, clip_mlp)
