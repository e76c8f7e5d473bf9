"""Tests of the Diff-Manner Adapter: identity at init, explicit convolution, alpha, ViT hooks."""

import open_clip
import pytest
import torch

from capt_lib.modules.adapter import DiffMannerAdapter, DiffMannerAdapterConfig, attach_adapters

WIDTH = 4
GRID = (2, 3)  # not square, so a swapped reshape would show


def make_adapter(**overrides):
    torch.manual_seed(0)
    cfg = DiffMannerAdapterConfig(heads=2, **overrides)
    return DiffMannerAdapter(WIDTH, GRID, cfg)


def make_tokens(batch_size=2):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch_size, 1 + GRID[0] * GRID[1], WIDTH, generator=generator)


def randomise_residual(adapter):
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in [adapter.local.weight, adapter.local.bias, *adapter.class_proj.parameters()]:
            parameter.copy_(torch.randn(parameter.shape, generator=generator))


def global_branch(adapter, tokens):
    h = adapter.norm(tokens)
    return adapter.attn(h, h, h, need_weights=False)[0]


def depthwise_conv_loop(x_hat_patches, weight, bias, grid):
    """Explicit depthwise convolution with zero padding: (B, H*W, C) -> (B, H*W, C)."""
    batch_size, _, channels = x_hat_patches.shape
    grid_h, grid_w = grid
    radius = weight.shape[-1] // 2
    out = torch.zeros_like(x_hat_patches)
    for b in range(batch_size):
        for c in range(channels):
            for h in range(grid_h):
                for w in range(grid_w):
                    total = bias[c].clone()
                    for u in range(-radius, radius + 1):
                        for v in range(-radius, radius + 1):
                            if 0 <= h + u < grid_h and 0 <= w + v < grid_w:
                                neighbour = x_hat_patches[b, (h + u) * grid_w + (w + v), c]
                                total = total + weight[c, 0, u + radius, v + radius] * neighbour
                    out[b, h * grid_w + w, c] = total
    return out


def test_identity_at_init():
    adapter = make_adapter()
    tokens = make_tokens()

    out = adapter(tokens, torch.tensor([0.3, 1.0]))

    assert torch.equal(out, tokens)


def test_identity_at_init_fixed_mode():
    adapter = make_adapter(alpha_mode="fixed", s=5.0)
    tokens = make_tokens()

    assert torch.equal(adapter(tokens), tokens)


def test_conv_gradient_alive_at_init():
    adapter = make_adapter()
    tokens = make_tokens()
    intensity = torch.tensor([0.5, 1.0])
    upstream = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))

    (adapter(tokens, intensity) * upstream).sum().backward()

    # d loss / d w[c, u, v] = sum_b alpha_b sum_{h, w} upstream[b, h, w, c] * X_hat[b, h+u, w+v, c]
    with torch.no_grad():
        x_hat = global_branch(adapter, tokens)[:, 1:]
        alpha = torch.tensor([0.5, 1.0])
        expected = torch.zeros_like(adapter.local.weight)
        for u in range(3):
            for v in range(3):
                basis = torch.zeros_like(adapter.local.weight)
                basis[:, 0, u, v] = 1.0
                shifted = depthwise_conv_loop(x_hat, basis, torch.zeros(WIDTH), GRID)
                expected[:, 0, u, v] = (alpha[:, None, None] * upstream[:, 1:] * shifted).sum((0, 1))
    assert adapter.local.weight.grad.abs().sum() > 0
    assert torch.allclose(adapter.local.weight.grad, expected, atol=1e-5)


def test_one_step_moves_off_identity():
    adapter = make_adapter()
    tokens = make_tokens()
    intensity = torch.tensor([0.5, 1.0])
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)

    loss = (adapter(tokens, intensity) - 1.0).pow(2).sum()
    loss.backward()
    optimizer.step()

    assert loss > 0
    assert not torch.equal(adapter(tokens, intensity), tokens)


def test_forward_matches_explicit_computation():
    adapter = make_adapter(s=2.0, gamma=2.0)
    randomise_residual(adapter)
    tokens = make_tokens()
    intensity = torch.tensor([0.5, 1.0])

    out = adapter(tokens, intensity)

    with torch.no_grad():
        x_hat = global_branch(adapter, tokens)
        alpha = torch.tensor([2.0 * 0.25, 2.0 * 1.0])[:, None, None]
        local = depthwise_conv_loop(x_hat[:, 1:], adapter.local.weight, adapter.local.bias, GRID)
        class_update = x_hat[:, :1] @ adapter.class_proj.weight.T + adapter.class_proj.bias
    assert torch.allclose(out[:, 1:], tokens[:, 1:] + alpha * local, atol=1e-5)
    assert torch.allclose(out[:, :1], tokens[:, :1] + alpha * class_update, atol=1e-5)


def test_class_token_unchanged_mode():
    adapter = make_adapter(class_token="unchanged")
    with torch.no_grad():
        adapter.local.weight.fill_(0.5)
    tokens = make_tokens()

    out = adapter(tokens, torch.tensor([1.0, 1.0]))

    assert adapter.class_proj is None
    assert torch.equal(out[:, 0], tokens[:, 0])
    assert not torch.equal(out[:, 1:], tokens[:, 1:])


@pytest.mark.parametrize(
    "s, gamma, c, expected",
    [
        (2.0, 2.0, [0.0, 0.5, 1.0], [0.0, 0.5, 2.0]),
        (1.0, 0.5, [0.25, 0.0], [0.5, 0.0]),
        (3.0, 0.0, [0.0, 0.7], [3.0, 3.0]),  # c**0 = 1, also at c = 0
    ],
)
def test_alpha_dynamic_by_hand(s, gamma, c, expected):
    adapter = make_adapter(s=s, gamma=gamma)

    alpha = adapter.alpha(torch.tensor(c), len(c))

    assert alpha.tolist() == pytest.approx(expected)


def test_alpha_fixed_ignores_intensity():
    adapter = make_adapter(alpha_mode="fixed", s=0.3)

    assert adapter.alpha(torch.tensor([0.0, 1.0]), 2).tolist() == pytest.approx([0.3, 0.3])
    assert adapter.alpha(None, 3).tolist() == pytest.approx([0.3, 0.3, 0.3])


def test_half_precision_tokens_keep_dtype():
    adapter = make_adapter()
    randomise_residual(adapter)
    tokens = make_tokens().to(torch.bfloat16)

    out = adapter(tokens, torch.tensor([0.5, 1.0]))

    assert out.dtype == torch.bfloat16
    assert not torch.equal(out, tokens)


def test_invalid_inputs_raise():
    adapter = make_adapter()
    tokens = make_tokens()

    with pytest.raises(ValueError, match=r"expected \(B, 7, 4\)"):
        adapter(tokens[:, :5])
    with pytest.raises(ValueError, match="needs the confusion intensity"):
        adapter(tokens)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        adapter(tokens, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        adapter(tokens, torch.tensor([0.5]))


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="kernel_size=4"):
        DiffMannerAdapterConfig(kernel_size=4)
    with pytest.raises(ValueError, match="alpha_mode='linear'"):
        DiffMannerAdapterConfig(alpha_mode="linear")
    with pytest.raises(ValueError, match="blocks is empty"):
        DiffMannerAdapterConfig(placement="in_blocks")
    with pytest.raises(ValueError, match="not divisible"):
        DiffMannerAdapter(WIDTH, GRID, DiffMannerAdapterConfig(heads=3))


# In-block placement on a tiny open_clip CLIP (random weights, 4x4 patch grid, 2 blocks).


def tiny_clip():
    torch.manual_seed(0)
    model = open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(image_size=28, patch_size=7, width=32, layers=2, head_width=16),
        text_cfg=dict(context_length=16, vocab_size=1000, width=32, heads=2, layers=1),
    )
    model.eval()
    model.requires_grad_(False)
    return model


def tiny_images():
    return torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(4))


def in_blocks_cfg(blocks=(0, 1)):
    return DiffMannerAdapterConfig(heads=2, placement="in_blocks", blocks=blocks)


def perturb(hooks):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for adapter in hooks.adapters.values():
            adapter.local.weight.copy_(torch.randn(adapter.local.weight.shape, generator=generator))
            adapter.class_proj.weight.copy_(torch.randn(adapter.class_proj.weight.shape, generator=generator))


def test_hooks_identity_at_init():
    model = tiny_clip()
    images = tiny_images()
    hooks = attach_adapters(model.visual, None, in_blocks_cfg())
    hooks.intensity = torch.tensor([0.2, 0.6, 1.0])

    # Under no_grad both runs take the same attention kernels. With autograd on, tokens
    # that require grad send the frozen blocks off nn.MultiheadAttention's inference
    # fast path, which differs in the last bits.
    with torch.no_grad():
        adapted = model.encode_image(images)
        hooks.remove()
        plain = model.encode_image(images)

    assert sorted(hooks.adapters) == ["0", "1"]
    assert torch.equal(adapted, plain)


def test_hooks_change_output_and_remove():
    model = tiny_clip()
    images = tiny_images()
    plain = model.encode_image(images)

    hooks = attach_adapters(model.visual, None, in_blocks_cfg())
    perturb(hooks)
    hooks.intensity = torch.tensor([0.2, 0.6, 1.0])
    adapted = model.encode_image(images)
    hooks.remove()
    restored = model.encode_image(images)

    assert not torch.allclose(adapted, plain)
    assert torch.equal(restored, plain)


def test_hooks_gradients_reach_adapters_only():
    model = tiny_clip()
    hooks = attach_adapters(model.visual, None, in_blocks_cfg())
    perturb(hooks)
    hooks.intensity = torch.tensor([0.2, 0.6, 1.0])

    model.encode_image(tiny_images()).pow(2).sum().backward()

    # After the last block only the class token is pooled, so the patch-token update
    # of block 1 (its depthwise convolution) cannot reach the image feature.
    dead = {"adapters.1.local.weight", "adapters.1.local.bias"}
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, parameter in hooks.named_parameters():
        assert parameter.grad is not None, name
        if name in dead:
            assert parameter.grad.abs().sum() == 0, name
        else:
            assert parameter.grad.abs().sum() > 0, name


def test_last_block_hook_equals_adapter_on_cached_tokens():
    model = tiny_clip()
    visual = model.visual
    images = tiny_images()
    intensity = torch.tensor([0.2, 0.6, 1.0])
    hooks = attach_adapters(visual, (-1,), in_blocks_cfg(blocks=(-1,)))
    perturb(hooks)
    hooks.intensity = intensity

    hooked = model.encode_image(images)
    hooks.remove()
    tokens = visual.transformer(visual._embeds(images))  # (B, 17, 32) after the last block
    adapted = hooks.adapters["1"](tokens, intensity)
    pooled, _ = visual._pool(adapted)
    direct = pooled @ visual.proj

    assert torch.allclose(hooked, direct, atol=1e-5)


def test_hooks_reject_stale_intensity():
    model = tiny_clip()
    hooks = attach_adapters(model.visual, None, in_blocks_cfg())
    hooks.intensity = torch.tensor([0.5, 0.5])

    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        model.encode_image(tiny_images())


def test_attach_rejects_bad_blocks_and_placement():
    model = tiny_clip()

    with pytest.raises(ValueError, match="out of range"):
        attach_adapters(model.visual, (2,), in_blocks_cfg())
    with pytest.raises(ValueError, match="twice"):
        attach_adapters(model.visual, (1, -1), in_blocks_cfg())
    with pytest.raises(ValueError, match="placement='in_blocks'"):
        attach_adapters(model.visual, (0,), DiffMannerAdapterConfig(heads=2))


def test_bottleneck_adapter_identity_at_init_and_trainable():
    cfg = DiffMannerAdapterConfig(heads=2, bottleneck=8)
    adapter = DiffMannerAdapter(width=32, grid_size=2, cfg=cfg)
    tokens = torch.randn(3, 5, 32)
    intensity = torch.tensor([0.2, 0.5, 1.0])

    assert torch.equal(adapter(tokens, intensity), tokens)

    adapter(tokens, intensity).pow(2).sum().backward()
    # The depthwise convolution is zero, but the up-projection behind it is not, so the
    # convolution receives a gradient at step 0 and the adapter can leave the identity.
    assert adapter.local.weight.grad.abs().sum() > 0
    assert adapter.down.weight.shape == (8, 32)
    assert adapter.up.weight.shape == (32, 8)


def test_bottleneck_must_be_divisible_by_heads():
    with pytest.raises(ValueError, match="not divisible"):
        DiffMannerAdapter(width=32, grid_size=2, cfg=DiffMannerAdapterConfig(heads=3, bottleneck=8))
