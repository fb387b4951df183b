"""A GPT-style decoder-only transformer (after nanoGPT): pre-norm blocks and causal
`scaled_dot_product_attention` (flash kernels on GPU), in two styles and every mix of them.

`gpt2` is GPT-2 of 2019: learned positions, LayerNorm, a GELU MLP, biases, a tied head. `modern` is today's
small-model recipe (modded-nanogpt, nanochat, Llama/Qwen3): rotary positions, RMSNorm, QK-norm, a SwiGLU
MLP, no biases, zero-initialised residual projections and head, an untied head. Each part is one keyword
(config.GPT_FIELDS); docs/gpt.md says what each buys.

Invariant: the gpt2 options build today's model exactly, module for module and in the same order, so a
seed gives the same weights and old checkpoints load under the same parameter names. Options only add or
drop modules (`wpe`, `q_norm`/`k_norm`, `gate`/`up`, biases); none renames one.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmdist.config import default_mlp_width
from lmdist.models.parameters import count_parameters


def norm_layer(kind: str, width: int, scale: bool, bias: bool, eps: float | None) -> nn.Module:
    """eps None: torch's default for the norm (LayerNorm 1e-5; RMSNorm the machine epsilon of its input's dtype)."""
    if kind == "layernorm":
        return nn.LayerNorm(width, eps=1e-5 if eps is None else eps, elementwise_affine=scale, bias=bias and scale)
    return nn.RMSNorm(width, eps=eps, elementwise_affine=scale)


class Rotary(nn.Module):
    """Rotary position embedding (RoPE): rotates each pair of query/key dimensions (i, i + d/2) by an angle
    proportional to the position, so a query-key score depends on their offset only. The pairing is
    Llama's `rotate_half` one. The angles are a buffer left out of state dicts: computed, never learned."""

    def __init__(self, head_dim: int, block_size: int, theta: float):
        super().__init__()
        frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (d/2,)
        angles = torch.outer(torch.arange(block_size, dtype=torch.float32), frequencies)  # (T, d/2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n_head, T, d) -> the same, rotated by position."""
        T, half = x.shape[-2], x.shape[-1] // 2
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, qk_norm: bool, norm_scale: bool,
                 rotary: Rotary | None, *, n_kv_head: int, head_dim: int, norm_eps: float | None, qkv_bias: bool):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim, self.dropout = n_head, n_kv_head, head_dim, dropout
        # No bias by default: a key bias cannot change the softmax, so its gradient is pure rounding noise that
        # Adam would amplify into updates; query/value biases add little (as in modern GPTs). Pretrained
        # GPT-2 and Qwen2 have one: qkv_bias.
        self.qkv = nn.Linear(n_embd, (n_head + 2 * n_kv_head) * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(n_head * head_dim, n_embd, bias=bias)
        self.resid_drop = nn.Dropout(dropout)
        if qk_norm:  # per head, as Qwen3 and modded-nanogpt: attention logits cannot grow without bound
            self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps, elementwise_affine=norm_scale)
            self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps, elementwise_affine=norm_scale)
        self.qk_norm = qk_norm
        self.rotary = rotary  # shared by every block; holds no parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, d = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv(x).split([nh * d, nkv * d, nkv * d], dim=2)
        q = q.view(B, T, nh, d).transpose(1, 2)  # (B, nh, T, d)
        k, v = (t.view(B, T, nkv, d).transpose(1, 2) for t in (k, v))  # (B, nkv, T, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        grouped = {"enable_gqa": True} if nkv != nh else {}  # query head h reads key/value head h // (nh / nkv)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True,
                                           **grouped)
        return self.resid_drop(self.proj(y.transpose(1, 2).reshape(B, T, nh * d)))


class MLP(nn.Module):
    """`gelu` (GPT-2; `gelu_tanh`, its tanh approximation, pretrained GPT-2's) or `relu2` (ReLU squared,
    modded-nanogpt): fc -> activation -> proj, `hidden` wide (4 x n_embd by default)."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool, activation: str):
        super().__init__()
        self.fc = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "relu2":
            h = F.relu(h).square()
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.drop(self.proj(h))


class SwiGLU(nn.Module):
    """Llama's MLP: proj(silu(gate(x)) * up(x)), `hidden` wide (config.swiglu_width(n_embd) by default)."""

    def __init__(self, n_embd: int, hidden: int, dropout: float, bias: bool):
        super().__init__()
        self.gate = nn.Linear(n_embd, hidden, bias=bias)
        self.up = nn.Linear(n_embd, hidden, bias=bias)
        self.proj = nn.Linear(hidden, n_embd, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.silu(self.gate(x)) * self.up(x)))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, *, norm: str, norm_scale: bool, bias: bool,
                 qk_norm: bool, mlp: str, rotary: Rotary | None, n_kv_head: int, head_dim: int, mlp_width: int,
                 norm_eps: float | None, qkv_bias: bool):
        super().__init__()
        self.ln_1 = norm_layer(norm, n_embd, norm_scale, bias, norm_eps)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias, qk_norm, norm_scale, rotary, n_kv_head=n_kv_head,
                                        head_dim=head_dim, norm_eps=norm_eps, qkv_bias=qkv_bias)
        self.ln_2 = norm_layer(norm, n_embd, norm_scale, bias, norm_eps)
        self.mlp = (SwiGLU(n_embd, mlp_width, dropout, bias) if mlp == "swiglu"
                    else MLP(n_embd, mlp_width, dropout, bias, mlp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int,
                 dropout: float, tie_weights: bool = True, *, position: str = "learned", rope_theta: float = 10000.0,
                 norm: str = "layernorm", norm_scale: bool = True, qk_norm: bool = False, mlp: str = "gelu",
                 bias: bool = True, zero_init: bool = False, n_kv_head: int | None = None, head_dim: int | None = None,
                 mlp_width: int | None = None, norm_eps: float | None = None, qkv_bias: bool = False):
        super().__init__()
        head_dim, mlp_width = head_dim or n_embd // n_head, mlp_width or default_mlp_width(mlp, n_embd)
        self.block_size, self.n_layer, self.n_embd = block_size, n_layer, n_embd
        self.attention_width = n_head * head_dim  # the query heads': n_embd unless head_dim says otherwise
        self.wte = nn.Embedding(vocab_size, n_embd)
        if position == "learned":
            self.wpe = nn.Embedding(block_size, n_embd)
        rotary = Rotary(head_dim, block_size, rope_theta) if position == "rope" else None
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, norm=norm, norm_scale=norm_scale, bias=bias,
                                          qk_norm=qk_norm, mlp=mlp, rotary=rotary, n_kv_head=n_kv_head or n_head,
                                          head_dim=head_dim, mlp_width=mlp_width, norm_eps=norm_eps, qkv_bias=qkv_bias)
                                    for _ in range(n_layer))
        self.ln_f = norm_layer(norm, n_embd, norm_scale, bias, norm_eps)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                if zero_init:  # each block starts as the identity; its first updates decide what it adds
                    nn.init.zeros_(p)
                else:  # GPT-2's scaled init: each block adds two residual branches, keep their sum's variance
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))
        if tie_weights:
            self.lm_head.weight = self.wte.weight
        elif zero_init:  # uniform first predictions; a tied head is the embedding and keeps its init
            nn.init.zeros_(self.lm_head.weight)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the blocks (attention and MLP projections): Muon's parameters. Not the
        embeddings, whose rows are looked up rather than multiplied, nor the head."""
        return [p for p in self.blocks.parameters() if p.dim() == 2]

    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, the PaLM convention: 6N for the weights plus
        12*L*n_embd*T for attention, N without the embedding lookups (positions; tokens, unless they are the
        head too). The attention term counts the query heads' width (n_head x head_dim); grouped keys and
        values change the weights, not it. Rotary angles and norms are elementwise, not matmuls."""
        lookups = [self.wpe.weight] if hasattr(self, "wpe") else []
        if self.lm_head.weight is not self.wte.weight:
            lookups.append(self.wte.weight)
        n = count_parameters(self) - sum(w.numel() for w in lookups)
        return 6 * n + 12 * self.n_layer * self.attention_width * self.block_size

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab)."""
        x = self.wte(idx)
        if hasattr(self, "wpe"):
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))
