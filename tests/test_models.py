"""The models: shapes, causality, tied weights, one module per LSTM layer, and the GPT's options and styles."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from lmdist.config import GPT_SHAPES, GPT_STYLES, TrainConfig, make_config, swiglu_width
from lmdist.models import GPT, LSTMLanguageModel, build_model, count_parameters
from lmdist.models.gpt import Rotary

SMALL_GPT = {"model": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16}


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_logits_shape_and_tied_weights(model):
    cfg = TrainConfig(model=model, embedding_dim=16, hidden_dim=16, n_embd=16, n_head=2, n_layer=2, block_size=8,
                      tie_weights=True)
    net = build_model(cfg, vocab_size=11)
    assert net(torch.randint(0, 11, (3, 8))).shape == (3, 8, 11)
    untied = build_model(TrainConfig(**{**cfg.to_dict(), "tie_weights": False}), vocab_size=11)
    assert count_parameters(untied) - count_parameters(net) == 11 * 16  # the output matrix, counted once when tied


@pytest.mark.parametrize("net", [GPT(13, 8, 2, 2, 16, 0.0), LSTMLanguageModel(13, 16, 16, 2, 0.0, True),
                                 build_model(make_config({**SMALL_GPT, "gpt_style": "modern", "dropout": 0,
                                                          "zero_init": False}), 13)])  # zero logits see nothing
def test_causal_future_tokens_do_not_change_past_logits(net):
    x = torch.randint(0, 13, (2, 8))
    y = x.clone()
    y[:, 5:] = (y[:, 5:] + 1) % 13
    with torch.no_grad():
        torch.testing.assert_close(net(x)[:, :5], net(y)[:, :5])
        assert not torch.allclose(net(x)[:, 5:], net(y)[:, 5:])


def test_lstm_is_one_module_per_layer_starting_from_zero_state():
    net = LSTMLanguageModel(13, 16, 32, 3, 0.0, tie_weights=True)
    assert len(net.layers) == 3 and all(layer.num_layers == 1 for layer in net.layers)
    assert [layer.hidden_size for layer in net.layers] == [32, 32, 16]  # tied: the last layer speaks embedding width
    x = torch.randint(0, 13, (4, 6))
    with torch.no_grad():  # each sequence starts from zeros, so batching does not matter
        torch.testing.assert_close(net(x)[1:2], net(x[1:2]))


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_bf16_autocast_on_cpu_trains_on_any_cpu(model):
    """CPU bf16 autocast (`--mixed_precision bf16`) must train on CPUs without AVX-512 too, where oneDNN has
    no bf16 LSTM: forward and backward run, and the loss stays within bf16's precision of fp32's."""
    cfg = TrainConfig(model=model, embedding_dim=16, hidden_dim=16, n_embd=16, n_head=2, n_layer=2, block_size=8)
    torch.manual_seed(0)
    net, x, y = build_model(cfg, vocab_size=11), torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    assert loss.item() == pytest.approx(F.cross_entropy(net(x).flatten(0, 1), y.flatten()).item(), rel=0.02)


# sha256 prefixes of the gpt2-style GPT's initial state dict and of its gradients on a fixed batch, recorded from
# lmdist's GPT before the styles existed (c5ac202, torch 2.13.0): tied, and untied.
# Measured with the code before GPT styles (6571c9b^): its weights bit for bit; its loss and gradients equal
# this model's bit for bit on one machine at 1 and 2 threads, but their last bits move with the CPU's kernels
# and the thread count, so those are compared to 1e-6 (a changed layer moves them by far more).
GPT2_BEFORE_STYLES = {True: ("a706aea9fdd7943d", 3.769435405731201, 1.9802436737508542, 0.991812466636139),
                      False: ("fdaa69e2a6dd0d5c", 4.187404155731201, 2.4275362497500956, -0.541665039682358)}


@pytest.mark.parametrize("tied", [True, False])
def test_the_gpt2_style_is_the_gpt_before_styles(tied):
    """Same parameter names, same initial weights for a seed, same loss and gradients: old checkpoints and
    exports load and old runs resume."""
    torch.manual_seed(0)
    net = build_model(make_config({**SMALL_GPT, "dropout": 0.1, "gpt_style": "gpt2", "tie_weights": tied}), 65)
    weights = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        weights.update(name.encode())
        weights.update(tensor.detach().contiguous().numpy().tobytes())
    torch.manual_seed(1)
    idx = torch.randint(0, 65, (2, 16))
    loss = F.cross_entropy(net.train()(idx).flatten(0, 1), idx.flatten())  # dropout's draws included
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in net.parameters()]).double()
    direction = torch.randn(grads.numel(), generator=torch.Generator().manual_seed(2)).double()
    want_weights, want_loss, want_norm, want_projection = GPT2_BEFORE_STYLES[tied]
    assert weights.hexdigest()[:16] == want_weights
    assert loss.item() == pytest.approx(want_loss, rel=1e-6)
    assert grads.norm().item() == pytest.approx(want_norm, rel=1e-6)
    assert (grads @ direction).item() == pytest.approx(want_projection, rel=1e-6)


def test_rope_scores_depend_only_on_the_offset():
    """q.k after rotation is the same for positions (i, j) and (i + s, j + s), and differs for another offset."""
    torch.manual_seed(0)
    rotary = Rotary(head_dim=8, block_size=32, theta=10000.0)
    q, k = torch.randn(8), torch.randn(8)

    def score(i: int, j: int) -> float:
        qs, ks = torch.zeros(1, 1, 32, 8), torch.zeros(1, 1, 32, 8)
        qs[0, 0, i], ks[0, 0, j] = q, k
        return (rotary(qs)[0, 0, i] @ rotary(ks)[0, 0, j]).item()

    assert score(10, 3) == pytest.approx(score(27, 20), abs=1e-5) == pytest.approx(score(7, 0), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
    assert score(3, 3) == pytest.approx((q @ k).item(), abs=1e-5)  # offset 0: no rotation


def names(net: torch.nn.Module) -> set[str]:
    return {name for name, _ in net.named_parameters()}


@pytest.mark.parametrize("option, value, check", [
    ("position", "rope", lambda net: "wpe.weight" not in names(net)),
    ("position", "learned", lambda net: net.wpe.weight.shape == (16, 32)),
    ("norm", "rmsnorm", lambda net: all(isinstance(m, torch.nn.RMSNorm) for m in (net.ln_f, net.blocks[0].ln_1))),
    ("norm", "layernorm", lambda net: isinstance(net.ln_f, torch.nn.LayerNorm)),
    ("norm_scale", False, lambda net: not any("ln_" in name or "norm" in name for name in names(net))),
    ("qk_norm", True, lambda net: {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight"} <= names(net)),
    ("qk_norm", False, lambda net: not any("q_norm" in name for name in names(net))),
    ("mlp", "swiglu", lambda net: {"blocks.0.mlp.gate.weight", "blocks.0.mlp.up.weight"} <= names(net)),
    ("mlp", "relu2", lambda net: net.blocks[0].mlp.activation == "relu2"),
    ("bias", False, lambda net: not any(name.endswith("bias") for name in names(net))),
    ("bias", True, lambda net: {"blocks.0.attn.proj.bias", "blocks.0.mlp.proj.bias"} <= names(net)
                               and ("ln_f.bias" in names(net)) == isinstance(net.ln_f, torch.nn.LayerNorm)),
    ("zero_init", True, lambda net: all(not p.any() for name, p in net.named_parameters()
                                        if name.endswith("proj.weight") or name == "lm_head.weight")),
    ("zero_init", False, lambda net: all(p.std() > 0 for name, p in net.named_parameters()
                                         if name.endswith("proj.weight"))),
    ("tie_weights", True, lambda net: net.lm_head.weight is net.wte.weight),
    ("tie_weights", False, lambda net: net.lm_head.weight is not net.wte.weight),
])
@pytest.mark.parametrize("style", ["gpt2", "modern"])
def test_each_option_shapes_the_gpt_over_either_style(style, option, value, check):
    """An explicit field overrides its style's value, and builds what the field says."""
    cfg = make_config({**SMALL_GPT, "gpt_style": style, option: value})
    assert cfg.architecture[option] == value
    assert check(build_model(cfg, 65))
    others = {k: v for k, v in cfg.architecture.items() if k not in (option, "rope_theta", *GPT_SHAPES)}
    assert others == {k: v for k, v in GPT_STYLES[style].items() if k != option}  # nothing else moved


def test_grouped_query_attention_shares_each_key_value_head_with_its_group():
    """n_kv_head 2 of n_head 4: query heads 0-1 read key/value head 0 and heads 2-3 head 1, as transformers'
    repeat_kv has it: the logits of full attention whose key/value heads are those heads repeated."""
    shape, d = {**SMALL_GPT, "n_head": 4, "gpt_style": "modern"}, 8
    grouped = build_model(make_config({**shape, "n_kv_head": 2}), 65).eval()
    full = build_model(make_config(shape), 65).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in grouped.parameters():
            parameter.normal_(0, 0.3)  # not the zero init, which would hide the attention
    state = grouped.state_dict()
    assert state["blocks.0.attn.qkv.weight"].shape == ((4 + 2 * 2) * d, 32)
    idx = torch.randint(0, 65, (2, 16))

    def full_logits(repeat) -> torch.Tensor:
        expanded = dict(state)
        for i in range(2):
            q, k, v = state[f"blocks.{i}.attn.qkv.weight"].split([4 * d, 2 * d, 2 * d])
            k, v = (repeat(t.view(2, d, 32)).reshape(4 * d, 32) for t in (k, v))
            expanded[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
        full.load_state_dict(expanded)
        return full(idx)

    torch.testing.assert_close(grouped(idx), full_logits(lambda t: t.repeat_interleave(2, dim=0)), rtol=0, atol=1e-5)
    assert not torch.allclose(grouped(idx), full_logits(lambda t: t.repeat(2, 1, 1)), atol=1e-3)  # heads 0-2, 1-3


@pytest.mark.parametrize("field, value, check", [
    ("head_dim", 24, lambda net: net.blocks[0].attn.qkv.weight.shape == (3 * 2 * 24, 32)
                                 and net.blocks[0].attn.proj.weight.shape == (32, 48)),
    ("mlp_width", 50, lambda net: net.blocks[0].mlp.gate.weight.shape == (50, 32)),
    ("norm_eps", 1e-3, lambda net: net.ln_f.eps == net.blocks[0].attn.q_norm.eps == 1e-3),
    ("qkv_bias", True, lambda net: net.blocks[0].attn.qkv.bias.shape == (3 * 32,)),
    ("mlp", "gelu_tanh", lambda net: net.blocks[0].mlp.activation == "gelu_tanh"),
])
def test_a_pretrained_models_shapes_build_what_they_say(field, value, check):
    net = build_model(make_config({**SMALL_GPT, "gpt_style": "modern", field: value}), 65)
    assert check(net)
    assert net(torch.randint(0, 65, (2, 16))).shape == (2, 16, 65)


def test_gelu_tanh_is_the_tanh_approximation():
    cfg = {**SMALL_GPT, "gpt_style": "gpt2"}
    exact, tanh = (build_model(make_config({**cfg, "mlp": mlp}), 65).blocks[0].mlp.eval()
                   for mlp in ("gelu", "gelu_tanh"))
    tanh.load_state_dict(exact.state_dict())
    x = torch.randn(4, 32) * 3
    torch.testing.assert_close(tanh(x), tanh.proj(F.gelu(tanh.fc(x), approximate="tanh")))
    assert not torch.allclose(tanh(x), exact(x), atol=1e-6)


def test_swiglu_keeps_the_gelu_mlps_parameter_count():
    for width in (32, 128, 384, 768):
        assert abs(3 * width * swiglu_width(width) - 2 * width * 4 * width) <= 3 * width * 4  # within one rounding
        assert swiglu_width(width) % 8 == 0
    shape = {**SMALL_GPT, "n_embd": 128, "gpt_style": "modern"}
    gelu, swiglu = (build_model(make_config({**shape, "mlp": mlp}), 65) for mlp in ("gelu", "swiglu"))
    assert count_parameters(swiglu) == pytest.approx(count_parameters(gelu), rel=0.01)


def test_the_styles_parameter_counts():
    """gpt2: tied head, learned positions, biases; modern: an untied head, no positions or biases, QK-norm scales."""
    V, T, C, L, head_dim, swiglu = 65, 16, 32, 2, 16, swiglu_width(32)
    gpt2_block = 2 * 2 * C + 3 * C * C + C * C + C + 4 * C * C + 4 * C + 4 * C * C + C  # norms, attention, MLP
    modern_block = 2 * C + 3 * C * C + C * C + 2 * head_dim + 3 * C * swiglu
    expected = {"gpt2": V * C + T * C + L * gpt2_block + 2 * C, "modern": 2 * V * C + L * modern_block + C}
    for style, parameters in expected.items():
        assert count_parameters(build_model(make_config({**SMALL_GPT, "gpt_style": style}), V)) == parameters


@pytest.mark.parametrize("style", ["gpt2", "modern"])
def test_activation_checkpointing_keeps_a_blocks_gradients_and_drops_its_activations(style):
    """FSDP's activation checkpointing (sharding._recomputed, FSDP_ACTIVATION_CHECKPOINTING) on either style's
    block: the same output and gradients, dropout's draws included, from far fewer tensors kept for backward."""
    from lmdist.sharding import _recomputed

    def run(recompute: bool) -> tuple[int, torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        block = build_model(make_config({**SMALL_GPT, "gpt_style": style, "dropout": 0.1, "zero_init": False}),
                            65).blocks[0]
        if recompute:
            block.forward = _recomputed(block.forward)
        x = torch.randn(2, 16, 32, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = block(x)
        y.square().sum().backward()
        return len(saved), y.detach(), [x.grad, *(p.grad for p in block.parameters())]

    (kept, y, grads), (kept_recomputed, y_recomputed, grads_recomputed) = run(False), run(True)
    assert torch.equal(y, y_recomputed)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads, grads_recomputed, strict=True))
    assert kept_recomputed * 5 <= kept
