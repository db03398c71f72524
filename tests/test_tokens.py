"""Vision-transformer tokens: the grid rule, layer discovery on three model families, the class-token attention."""

import warnings

import pytest
import torch
from helpers import BlocksViT, tiny_vit
from lightly.models.modules import MaskedVisionTransformerTorchvision
from torch import nn

from tsm_lightning import TokenGrid, attention_maps, explain, saliency_maps, tokens_to_grid
from tsm_lightning.capture import capture
from tsm_lightning.core.attention import class_token_attention
from tsm_lightning.discovery import find_layer
from tsm_lightning.pipeline import attention_module, capture_features, explain_batch
from tsm_lightning.tokens import (
    MAX_PREFIX_TOKENS,
    attention_rows,
    find_attention,
    repeated_blocks,
    resolve_grid,
)


def _manual_grid(tokens: torch.Tensor, prefix: int, h: int, w: int) -> torch.Tensor:
    """Straightforward reference: patch token prefix + i * w + j goes to cell (i, j)."""
    b, _, d = tokens.shape
    out = torch.empty(b, d, h, w)
    for n in range(b):
        for i in range(h):
            for j in range(w):
                out[n, :, i, j] = tokens[n, prefix + i * w + j]
    return out


@pytest.mark.parametrize(
    ("prefix", "grid", "kwargs"),
    [
        (1, (4, 4), {}),  # class token, square: found by the square rule
        (0, (5, 5), {}),  # no prefix token
        (5, (3, 3), {"prefix_tokens": 5}),  # class + 4 registers, stated
        (5, (6, 8), {"grid": (6, 8)}),  # registers and a non-square grid
        (1, (2, 7), {"grid": (2, 7), "prefix_tokens": 1}),
    ],
)
def test_tokens_to_grid_matches_a_manual_reshape(prefix, grid, kwargs):
    h, w = grid
    tokens = torch.randn(3, prefix + h * w, 6)
    expected = _manual_grid(tokens, prefix, h, w)
    assert torch.equal(tokens_to_grid(tokens, **kwargs), expected)


def test_square_rule_drops_class_and_register_tokens():
    assert resolve_grid(197) == (1, 14, 14)
    assert resolve_grid(201) == (5, 14, 14)  # class + 4 registers (DINOv2-reg)
    assert resolve_grid(196) == (0, 14, 14)
    assert resolve_grid(50, patch_grid=(7, 7)) == (1, 7, 7)
    assert resolve_grid(1 + 24, patch_grid=(4, 6)) == (1, 4, 6)


def test_token_counts_that_fit_no_grid_say_so():
    with pytest.raises(ValueError, match=rf"120 tokens fit no square grid with at most {MAX_PREFIX_TOKENS}"):
        tokens_to_grid(torch.randn(1, 120, 4))
    with pytest.raises(ValueError, match=r"195 patches, which is not a square grid"):
        tokens_to_grid(torch.randn(1, 197, 4), prefix_tokens=2)
    with pytest.raises(ValueError, match=r"190 tokens do not fit a 14x14 patch grid"):
        tokens_to_grid(torch.randn(1, 190, 4), grid=(14, 14))
    with pytest.raises(ValueError, match=r"do not fit 2 prefix tokens \+ a 4x4"):
        tokens_to_grid(torch.randn(1, 17, 4), grid=(4, 4), prefix_tokens=2)
    with pytest.raises(ValueError, match=r"\(B, T, D\) token sequence"):
        tokens_to_grid(torch.randn(17, 4))
    with pytest.raises(ValueError, match=r"tuple \(h, w\) of positive integers"):
        TokenGrid(grid=(4, 0))
    with pytest.raises(ValueError, match=r"integer >= 0"):
        TokenGrid(prefix_tokens=-1)


def test_saliency_maps_of_tokens_point_to_tokens_to_grid():
    tokens = torch.randn(2, 17, 8)
    with pytest.raises(ValueError, match="tokens_to_grid"):
        saliency_maps(tokens)
    maps = saliency_maps(tokens_to_grid(tokens), methods=["tsm"])
    assert maps["tsm"].shape == (2, 4, 4)


# ------------------------------------------------------------------------------------------------ discovery
def test_torchvision_vit_gets_its_last_block_never_the_patch_embedding():
    vit = tiny_vit(image_size=32, patch_size=4, num_layers=3)
    with pytest.warns(UserWarning, match=r"encoder_layer_2' \(the last transformer block\), tokens \(2, 65, 16\) as"):
        layer = find_layer(vit, torch.randn(2, 3, 32, 32))
    assert layer == "encoder.layers.encoder_layer_2"
    assert "encoder.layers.encoder_layer_0" in repeated_blocks(vit)


def test_lightly_vit_wrapper_in_a_backbone_gets_the_last_block():
    model = nn.Module()
    model.backbone = MaskedVisionTransformerTorchvision(vit=tiny_vit(num_layers=2))
    model.head = nn.Linear(16, 4)
    layer = find_layer(model, torch.randn(2, 3, 16, 16), warn=False)
    assert layer == "backbone.vit.encoder.layers.encoder_layer_1"
    maps = explain(model, torch.randn(2, 3, 16, 16), layer=layer)
    assert set(maps) == {"eigencam", "tsm", "multivec_eigencam", "mtsm", "attention"}


def test_blocks_model_with_registers_and_a_non_square_grid():
    model = BlocksViT(grid=(4, 6), registers=4, depth=3)
    images = torch.randn(2, 3, 16, 24)
    assert find_layer(model, images, warn=False) == "blocks.2"
    with capture(model, "blocks.1") as cap:
        model(images)
    assert cap.layout == (5, 4, 6)  # the grid read from patch_embed.proj, the 5 leading tokens dropped
    with capture(model, "blocks.1", feature_map=False) as raw:
        model(images)
    assert torch.equal(cap.features, _manual_grid(raw.value, 5, 4, 6))
    assert explain(model, images, layer="blocks.2")["tsm"].shape == (2, 16, 24)


def test_grid_comes_from_the_patch_embedding_that_runs():
    model = nn.Module()
    model.teacher = BlocksViT(grid=(2, 3), patch_size=8)  # registered first, never called below
    model.student = BlocksViT(grid=(4, 6), patch_size=4)
    images = torch.randn(1, 3, 16, 24)
    with capture(model, "student.blocks.1") as cap:
        model.student(images)
    assert cap.layout == (1, 4, 6)  # not the square rule's 5x5 of 25 tokens, nor the teacher's 2x3


def test_discovery_never_falls_back_to_the_patch_embedding():
    model = BlocksViT(grid=(4, 4))
    with pytest.raises(
        ValueError, match=r"last transformer block 'blocks.1' returns tokens \(1, 17, 16\), which fit no"
    ):
        find_layer(model, torch.randn(1, 3, 16, 16), token_grid=TokenGrid(grid=(5, 5)))


def test_cnn_discovery_is_unchanged_by_the_transformer_rule():
    from helpers import SiameseNet

    assert find_layer(SiameseNet(), torch.randn(2, 3, 16, 16), warn=False) == "backbone.5"


def test_user_token_grid_overrides_the_rule():
    model = BlocksViT(grid=(4, 6), registers=2)
    images = torch.randn(1, 3, 16, 24)
    with pytest.raises(ValueError, match=r"do not fit 1 prefix tokens \+ a 4x6"):
        explain(model, images, layer="blocks.1", token_grid=TokenGrid(prefix_tokens=1))

    def last_24(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, -24:].transpose(1, 2).reshape(tokens.shape[0], -1, 4, 6)

    features = capture_features(model, images, "blocks.1", token_grid=last_24).features
    assert features.shape == (1, 16, 4, 6)
    with pytest.raises(ValueError, match=r"must return a \(B, D, h, w\) map"):
        capture_features(model, images, "blocks.1", token_grid=lambda t: t)


# ------------------------------------------------------------------------------------------------ attention
def test_class_token_attention_matches_torch_multihead_attention():
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(3, 10, 16)
    with torch.no_grad():
        _, weights = mha(x, x, x, need_weights=True, average_attn_weights=False)  # (B, heads, T, T)
        rows = attention_rows(mha, (x, x, x), {})
    torch.testing.assert_close(rows, weights[:, :, 0], atol=1e-6, rtol=1e-5)
    seq_first = nn.MultiheadAttention(16, 4).eval()
    seq_first.load_state_dict(mha.state_dict())
    with torch.no_grad():
        xt = x.transpose(0, 1)
        torch.testing.assert_close(attention_rows(seq_first, (xt, xt, xt), {}), rows, atol=1e-6, rtol=1e-5)


def test_class_token_attention_of_a_qkv_module_matches_q_and_k():
    model = BlocksViT(grid=(4, 4), registers=1)
    attn = model.blocks[-1].attn
    attn.scale = 0.25  # not 1 / sqrt(head_dim): the module's own scale must be used
    x = torch.randn(2, 18, 16)
    with torch.no_grad():
        rows = attention_rows(attn, (x,), {})
        q, k, _ = attn.qkv(x).reshape(2, 18, 3, 2, 8).permute(2, 0, 3, 1, 4)
    expected = torch.empty(2, 2, 18)
    for b in range(2):
        for h in range(2):
            expected[b, h] = torch.softmax(k[b, h] @ q[b, h, 0] * 0.25, dim=0)
    torch.testing.assert_close(rows, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(rows.sum(-1), torch.ones(2, 2))
    torch.testing.assert_close(class_token_attention(q, k, scale=0.25), expected, atol=1e-6, rtol=1e-5)


def test_attention_maps_of_a_torchvision_vit_match_the_blocks_own_weights():
    vit = tiny_vit(image_size=32, patch_size=4, num_layers=2, num_heads=4).eval()
    images = torch.randn(2, 3, 32, 32)
    block = vit.encoder.layers.encoder_layer_1
    seen = {}
    handle = block.ln_1.register_forward_hook(lambda m, a, out: seen.setdefault("x", out))
    with torch.no_grad():
        vit(images)
        _, weights = block.self_attention(seen["x"], seen["x"], seen["x"], average_attn_weights=False)
    handle.remove()
    expected = weights[:, :, 0, 1:].reshape(2, 4, 8, 8)  # class-token row, patch columns
    layer = "encoder.layers.encoder_layer_1"
    name = attention_module(vit, layer)
    assert name == "encoder.layers.encoder_layer_1.self_attention" == find_attention(vit)
    got = capture_features(vit, images, layer, attention=name, attention_required=True).attention
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    heads = attention_maps(vit, images, per_head=True)
    assert heads.shape == (2, 4, 32, 32) and heads.amin() >= 0 and heads.amax() <= 1
    mean = attention_maps(vit, images)
    assert mean.shape == (2, 32, 32)
    explanation = explain_batch(vit, images, layer)
    torch.testing.assert_close(explanation.attention, expected, atol=1e-6, rtol=1e-5)
    m = expected.mean(1).flatten(1)
    normalised = ((m - m.amin(1, keepdim=True)) / (m.amax(1, keepdim=True) - m.amin(1, keepdim=True))).reshape(2, 8, 8)
    torch.testing.assert_close(explanation.maps["attention"], normalised, atol=1e-5, rtol=1e-5)


def test_attention_is_the_monitored_networks_not_a_teachers():
    model = nn.Module()
    model.backbone = tiny_vit(num_layers=2)
    model.teacher_backbone = tiny_vit(num_layers=2)  # registered after the student, never called
    layer = "backbone.encoder.layers.encoder_layer_1"
    assert attention_module(model, layer) == "backbone.encoder.layers.encoder_layer_1.self_attention"
    maps = explain(model, torch.randn(2, 3, 16, 16), layer=layer, forward_fn=lambda m, x: m.backbone(x))
    assert "attention" in maps
    teacher = "teacher_backbone.encoder.layers.encoder_layer_1.self_attention"
    with pytest.warns(UserWarning, match="did not run in the forward pass"):
        assert capture_features(model, torch.randn(1, 3, 16, 16), layer, attention=teacher).attention is None
    with pytest.raises(ValueError, match="did not run in the forward pass"):
        capture_features(model, torch.randn(1, 3, 16, 16), layer, attention=teacher, attention_required=True)


def test_attention_needs_a_class_token_and_a_readable_module():
    model = BlocksViT(grid=(4, 4), class_token=False)
    images = torch.randn(1, 3, 16, 16)
    assert "attention" not in explain(model, images, layer="blocks.1")  # automatic: left out
    with pytest.raises(ValueError, match="no class token"):
        explain(model, images, layer="blocks.1", attention=True)
    from helpers import SiameseNet

    with pytest.raises(ValueError, match="no class-token attention module this package can read"):
        explain(SiameseNet(), torch.randn(1, 3, 16, 16), layer="backbone.5", attention=True)
    assert "attention" not in explain(tiny_vit(), torch.randn(1, 3, 16, 16), attention=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        maps = explain(tiny_vit(), torch.randn(1, 3, 16, 16), layer="encoder.layers.encoder_layer_0")
    assert "attention" in maps  # the last block's attention, placed on an earlier block's (identical) grid


def test_a_vit_is_left_exactly_as_it_was():
    vit = tiny_vit()
    vit.train()
    vit.encoder.layers.encoder_layer_0.eval()
    modes = {n: m.training for n, m in vit.named_modules()}
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    explain(vit, torch.randn(2, 3, 16, 16), layer="encoder.layers.encoder_layer_1")
    assert {n: m.training for n, m in vit.named_modules()} == modes
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in vit.modules())
    assert all(torch.equal(v, state[k]) for k, v in vit.state_dict().items())


# ------------------------------------------------------------------- only class-token attention counts as attention
def _hf(model_name: str, **extra):
    import transformers

    config_cls = getattr(transformers, model_name.replace("Model", "Config"))
    config = config_cls(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        attn_implementation="eager",
        **extra,
    )
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize(
    ("model_name", "extra", "prefix", "size"),
    [
        ("ViTModel", {}, 1, (32, 32)),
        ("Dinov2Model", {}, 1, (32, 48)),
        ("Dinov2WithRegistersModel", {"num_register_tokens": 4}, 5, (32, 48)),
    ],
)
def test_hugging_face_class_token_attention_matches_its_eager_output_attentions(model_name, extra, prefix, size):
    model = _hf(model_name, **extra)
    images = torch.randn(2, 3, *size)
    layer = find_layer(model, images, warn=False)
    name = attention_module(model, layer, True)
    assert name is not None and name.endswith("1.attention")  # the last block's self-attention module
    captured = capture_features(model, images, layer, attention=name, attention_required=True)
    with torch.no_grad():
        reference = model(images, output_attentions=True).attentions[-1]  # (B, heads, T, T), eager
    h, w = size[0] // 8, size[1] // 8
    expected = reference[:, :, 0, prefix:].reshape(2, 2, h, w)
    torch.testing.assert_close(captured.attention, expected)
    assert captured.features.shape == (2, 32, h, w)
    sdpa = _hf(model_name, **extra)
    sdpa.config._attn_implementation = "sdpa"  # fused kernels return no weights: the recomputation still reads them
    again = capture_features(sdpa, images, layer, attention=name, attention_required=True)
    torch.testing.assert_close(again.attention, expected)


def _swins():
    from timm.models.swin_transformer import SwinTransformer
    from torchvision.models.swin_transformer import SwinTransformer as TorchvisionSwin

    timm_swin = SwinTransformer(
        img_size=56, patch_size=4, window_size=7, embed_dim=16, depths=(1, 1), num_heads=(1, 2), num_classes=0
    )
    return [timm_swin.eval(), TorchvisionSwin([4, 4], 16, [1, 1], [1, 2], [7, 7], num_classes=10).eval()]


@pytest.mark.parametrize("index", [0, 1])
def test_window_attention_is_skipped_without_an_error_and_refused_on_request(index):
    swin = _swins()[index]
    images = torch.randn(2, 3, 56, 56)
    assert find_attention(swin) is None  # window attention is no class-token attention
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        maps = explain(swin, images, methods=["tsm"])
    assert set(maps) == {"tsm"}
    with pytest.raises(ValueError, match=r"window attention such as Swin's has no class token\); pass attention=False"):
        explain(swin, images, methods=["tsm"], attention=True)
    window = next(n for n, m in swin.named_modules() if type(m).__name__.endswith("WindowAttention"))
    layer = "norm" if index == 0 else "permute"
    quiet = capture_features(swin, images, layer, forward_fn=lambda m, x: m(x), attention=window)
    assert quiet.attention is None  # asked by name but not required: skipped without an error
    with pytest.raises(
        ValueError, match=r"is window attention \(Swin\), which has no class token; pass attention=False"
    ):
        capture_features(swin, images, layer, forward_fn=lambda m, x: m(x), attention=window, attention_required=True)


def test_a_vit_without_class_token_gives_no_attention_and_refuses_it_on_request():
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, class_token=False, global_pool="avg"
    ).eval()
    images = torch.randn(2, 3, 32, 32)
    maps = explain(vit, images, layer="blocks.1", methods=["tsm"])
    assert set(maps) == {"tsm"}
    with pytest.raises(ValueError, match=r"no class token.*pass attention=False"):
        explain(vit, images, layer="blocks.1", methods=["tsm"], attention=True)


@pytest.mark.parametrize(
    ("name", "prefix", "grid"),
    [
        ("vit_small_patch14_reg4_dinov2", 5, 4),  # class token + 4 registers
        ("deit_tiny_distilled_patch16_224", 2, 4),  # class + distillation token
        ("eva02_tiny_patch14_224", 1, 4),  # separate q/v biases, rotary embedding on the patch tokens
    ],
)
def test_timm_class_token_attention_matches_the_blocks_own_softmax(name, prefix, grid):
    import timm

    torch.manual_seed(0)
    size = 14 * grid if "patch14" in name else 16 * grid
    kwargs = {"img_size": size} if "eva" not in name else {"img_size": size, "dynamic_img_size": False}
    model = timm.create_model(name, pretrained=False, depth=2, **kwargs).eval()
    for module in model.modules():  # q_bias of a fresh EVA is zero: make the biases matter
        for attr in ("q_bias", "v_bias"):
            if isinstance(getattr(module, attr, None), nn.Parameter):
                nn.init.normal_(getattr(module, attr), std=0.5)
    images = torch.randn(2, 3, size, size)
    attention = model.blocks[1].attn
    attention.fused_attn = False  # the eager path, whose softmax output goes through attn_drop
    seen = []
    handle = attention.attn_drop.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    captured = capture_features(model, images, "blocks.1", attention="blocks.1.attn", attention_required=True)
    handle.remove()
    expected = seen[0][:, :, 0, prefix:].reshape(2, -1, grid, grid)
    torch.testing.assert_close(captured.attention, expected)
