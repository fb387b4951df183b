"""The models: shapes, causality, tied weights, one module per LSTM layer."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lmdist.config import TrainConfig
from lmdist.models import GPT, LSTMLanguageModel, build_model, count_parameters


@pytest.mark.parametrize("model", ["lstm", "gpt"])
def test_logits_shape_and_tied_weights(model):
    cfg = TrainConfig(model=model, embedding_dim=16, hidden_dim=16, n_embd=16, n_head=2, n_layer=2, block_size=8)
    net = build_model(cfg, vocab_size=11)
    assert net(torch.randint(0, 11, (3, 8))).shape == (3, 8, 11)
    untied = build_model(TrainConfig(**{**cfg.to_dict(), "tie_weights": False}), vocab_size=11)
    assert count_parameters(untied) - count_parameters(net) == 11 * 16  # the output matrix, counted once when tied


@pytest.mark.parametrize("net", [GPT(13, 8, 2, 2, 16, 0.0), LSTMLanguageModel(13, 16, 16, 2, 0.0, True)])
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
