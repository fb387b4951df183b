"""lmdist's GPT in transformers' format and back: the config.json and tensor names of the transformers model
with the same maths, so that an export loads with `AutoModelForCausalLM.from_pretrained` and computes the
same logits.

Which transformers model, by architecture (config.architecture):
- learned positions, LayerNorm, GELU, no QK-norm (the `gpt2` style): `GPT2LMHeadModel`. GPT-2 stores its
  linear layers as Conv1D, (in, out): transposed here. Its c_attn always has a bias: zeros, as lmdist's qkv
  has none.
- RoPE, RMSNorm, SwiGLU (the `modern` style): `LlamaForCausalLM`, or with QK-norm `Qwen3ForCausalLM` (its
  q_norm/k_norm are per head, before the rotation, as lmdist's). lmdist's fused qkv matrix is split into
  q_proj, k_proj and v_proj by rows.
- `--model hf` is a transformers model already: its names, under `hf.`, and its own config.
- Anything else has no exact equivalent (`NotExportable` names the option); never an approximate model.
A scale or bias lmdist's model leaves out (norm_scale or bias off) is written as ones or zeros, the same
function; reading back, such a tensor must hold exactly that value. The vocabulary is the model's rows,
padding included (`vocab_multiple`), so config.json and the tensors agree.

Nothing here imports transformers but `--model hf`'s config: the files are JSON and safetensors, written on
the default path.
"""
from __future__ import annotations

import torch

from lmdist.checkpoint import CheckpointError, without_tied_copies
from lmdist.config import TOKENIZER_NAMES, TrainConfig
from lmdist.models.hf import HF_PREFIX

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, as lmdist builds it
RMSNORM_EPS = torch.finfo(torch.float32).eps  # nn.RMSNorm(eps=None) in fp32, lmdist's
CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new"}  # lmdist's mlp -> GPT-2's activation_function


class NotExportable(Exception):
    """The model has no exact transformers equivalent; the message says which option, and what would have one."""


def family(cfg: TrainConfig) -> str:
    """The transformers model_type with lmdist's maths for `cfg`'s model, or NotExportable."""
    if cfg.model != "gpt":
        raise NotExportable("the LSTM has no transformers equivalent")
    arch = cfg.architecture
    if arch["position"] == "learned":
        unlike = _unlike(arch, norm="layernorm", qk_norm=False, n_kv_head=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head)
        if arch["mlp"] not in GPT2_ACTIVATIONS:
            unlike = ", ".join(filter(None, [unlike, f"mlp {arch['mlp']}"]))
        if not unlike:
            return "gpt2"
        raise NotExportable(f"learned positions with {unlike}: GPT-2, transformers' model with learned positions, "
                            "has LayerNorm, a GELU MLP, no QK-norm and n_embd / n_head heads of keys and values")
    unlike = _unlike(arch, norm="rmsnorm", mlp="swiglu")
    if not unlike and not (arch["qk_norm"] and arch["bias"]):
        return "qwen3" if arch["qk_norm"] else "llama"
    raise NotExportable(f"rope with {unlike or 'qk_norm and bias'}: Llama and Qwen3, transformers' models with "
                        "rotary positions, have RMSNorm and a SwiGLU MLP (Qwen3 adds QK-norm, without MLP biases)")


def _unlike(arch: dict, **wanted) -> str:
    return ", ".join(f"{name} {arch[name]}" for name, value in wanted.items() if arch[name] != value)


def fields_from_config(hf: dict, block_size: int) -> dict:
    """lmdist's model fields for a transformers config.json (as a dict) of a family lmdist's GPT computes
    exactly: GPT-2, Llama (without RoPE scaling), Qwen2, Qwen3. NotExportable names what does not fit."""
    kind, tie = hf.get("model_type"), hf.get("tie_word_embeddings", hf.get("model_type") == "gpt2")
    if kind == "gpt2":
        activation = hf.get("activation_function", "gelu_new")
        mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(activation)
        if mlp is None or hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise NotExportable(f"GPT-2 with activation_function {activation}, scale_attn_by_inverse_layer_idx "
                                f"{hf.get('scale_attn_by_inverse_layer_idx')}, scale_attn_weights "
                                f"{hf.get('scale_attn_weights', True)}: lmdist's GPT has GELU (or its tanh form) "
                                "and attention scaled by 1/sqrt(head width) only")
        positions = hf.get("n_positions", 1024)
        if block_size > positions:
            raise NotExportable(f"block_size {block_size} is longer than its {positions} learned positions")
        return {"model": "gpt", "gpt_style": "gpt2", "n_layer": hf["n_layer"], "n_head": hf["n_head"],
                "n_embd": hf["n_embd"], "position": "learned", "norm": "layernorm", "norm_scale": True,
                "qk_norm": False, "mlp": mlp, "bias": True, "qkv_bias": True, "zero_init": False, "tie_weights": tie,
                "mlp_width": hf.get("n_inner") or 4 * hf["n_embd"], "norm_eps": hf.get("layer_norm_epsilon", 1e-5)}
    if kind not in ("llama", "qwen2", "qwen3"):
        raise NotExportable(f"model_type {kind!r}: lmdist's GPT computes gpt2, llama, qwen2 and qwen3 exactly")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {f"rope_type {rope_type}": rope_type != "default",
                   f"hidden_act {hf.get('hidden_act')}": hf.get("hidden_act", "silu") != "silu",
                   "use_sliding_window": bool(hf.get("use_sliding_window"))}
    if any(unsupported.values()):
        raise NotExportable(f"{kind} with {', '.join(k for k, v in unsupported.items() if v)}: lmdist's GPT has "
                            "unscaled RoPE, a SiLU SwiGLU and full causal attention")
    qkv_bias = kind == "qwen2" or hf.get("attention_bias", False)
    heads = hf["num_attention_heads"]
    return {"model": "gpt", "gpt_style": "modern", "n_layer": hf["num_hidden_layers"], "n_head": heads,
            "n_embd": hf["hidden_size"], "position": "rope", "norm": "rmsnorm", "norm_scale": True,
            "qk_norm": kind == "qwen3", "mlp": "swiglu", "zero_init": False, "tie_weights": tie,
            # lmdist's `bias` is the output projection's and the MLP's; a bias transformers lacks reads as zeros
            "bias": kind != "qwen2" and (hf.get("attention_bias", False) or hf.get("mlp_bias", False)),
            "qkv_bias": qkv_bias, "n_kv_head": hf.get("num_key_value_heads") or heads,
            "head_dim": hf.get("head_dim") or hf["hidden_size"] // heads, "mlp_width": hf["intermediate_size"],
            "norm_eps": hf.get("rms_norm_eps", 1e-6), "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 1e4))}


def config(cfg: TrainConfig, vocab_rows: int, eos_id: int | None) -> dict:
    """config.json for `cfg`'s model with `vocab_rows` embedding rows."""
    if cfg.model == "hf":
        from lmdist.models import hf

        # a tokenizer folder is a pretrained tokenizer, whose ids the config was written for; lmdist's own are not
        return hf.export_config(cfg.hf_config, vocab_rows, eos_id, own_tokenizer=cfg.tokenizer not in TOKENIZER_NAMES)
    arch, kind = cfg.architecture, family(cfg)
    common = {"architectures": [CLASSES[kind]], "model_type": kind, "vocab_size": vocab_rows,
              "tie_word_embeddings": arch["tie_weights"], "bos_token_id": eos_id, "eos_token_id": eos_id,
              "initializer_range": 0.02, "dtype": "float32", "use_cache": True}
    eps = arch["norm_eps"]
    if kind == "gpt2":
        return {**common, "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer,
                "n_head": cfg.n_head, "n_inner": arch["mlp_width"],
                "activation_function": GPT2_ACTIVATIONS[arch["mlp"]],
                "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout,
                "layer_norm_epsilon": LAYERNORM_EPS if eps is None else eps, "scale_attn_weights": True,
                "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False}
    theta = arch["rope_theta"]
    return {**common, "hidden_size": cfg.n_embd, "intermediate_size": arch["mlp_width"],
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": arch["n_kv_head"], "head_dim": arch["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": cfg.block_size, "rms_norm_eps": RMSNORM_EPS if eps is None else eps,
            # one flag for the four attention projections: a bias lmdist's model lacks is written as zeros
            "attention_bias": arch["bias"] or arch["qkv_bias"], "attention_dropout": 0.0,
            # transformers 5 reads rope_parameters, 4.x rope_theta: both, the same value
            "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "rope_theta": theta,
            **({"mlp_bias": arch["bias"]} if kind == "llama" else {"use_sliding_window": False})}


def to_transformers(cfg: TrainConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """lmdist's weights (a model's state dict; a tied head's copy may be absent) in transformers' names."""
    if cfg.model == "hf":
        return {name.removeprefix(HF_PREFIX): t.contiguous() for name, t in without_tied_copies(state).items()}
    out = {}
    for lmdist_name, hf_name, how, width in _pairs(cfg, state):
        if lmdist_name is None:
            out[hf_name] = (torch.ones if how == "ones" else torch.zeros)(width, dtype=state["wte.weight"].dtype)
        elif how == "T":
            out[hf_name] = state[lmdist_name].t().contiguous()
        elif how in ("q", "k", "v"):
            out[hf_name] = state[lmdist_name].split(_qkv_rows(cfg))["qkv".index(how)].contiguous()
        else:
            out[hf_name] = state[lmdist_name].contiguous()
    return out


def from_transformers(cfg: TrainConfig, tensors: dict[str, torch.Tensor], lmdist_names: set[str],
                      rows: dict[str, int] | None = None) -> dict:
    """transformers' weights in the names of lmdist's model for `cfg` (whose state dict has `lmdist_names`).
    `rows`: lmdist name -> the rows its model has where a pretrained model has more (learned positions past
    block_size): the first rows are kept, the others never used."""
    if cfg.model == "hf":
        return {HF_PREFIX + name: tensor for name, tensor in tensors.items()}
    state, qkv = {}, {}
    for lmdist_name, hf_name, how, width in _pairs(cfg, lmdist_names):
        if hf_name not in tensors:  # a bias the pretrained model lacks is zero (Llama: mlp_bias, no attention_bias)
            if lmdist_name is None and how == "zeros":
                continue
            if lmdist_name is not None and lmdist_name.endswith(".bias") and how == "copy":
                state[lmdist_name] = torch.zeros(width)
                continue
            raise CheckpointError(f"the transformers weights lack {hf_name}, which a {family(cfg)} model of this "
                                  "config has")
        tensor = tensors[hf_name]
        if rows and lmdist_name in rows:
            tensor = tensor[:rows[lmdist_name]]
        if lmdist_name is None:  # lmdist's model has no such parameter: only its neutral value is the same maths
            if not torch.equal(tensor, torch.full_like(tensor, 1.0 if how == "ones" else 0.0)):
                raise CheckpointError(f"{hf_name} is not all {1 if how == 'ones' else 0}s, and lmdist's model has no "
                                      "such parameter to hold it")
        elif how == "T":
            state[lmdist_name] = tensor.t().contiguous()
        elif how in ("q", "k", "v"):
            qkv.setdefault(lmdist_name, {})[how] = tensor
        else:
            state[lmdist_name] = tensor
    for name, parts in qkv.items():
        state[name] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return state


def _qkv_rows(cfg: TrainConfig) -> list[int]:
    arch = cfg.architecture
    return [cfg.n_head * arch["head_dim"], arch["n_kv_head"] * arch["head_dim"], arch["n_kv_head"] * arch["head_dim"]]


def _pairs(cfg: TrainConfig, lmdist_names) -> list[tuple[str | None, str, str, int]]:
    """(lmdist name or None, transformers name, how, width): `how` is copy, T (transposed), q/k/v (those rows
    of the fused qkv), or ones/zeros where lmdist's model has no such tensor (`width` long)."""
    arch, C, kind = cfg.architecture, cfg.n_embd, family(cfg)
    q_rows, kv_rows, _ = _qkv_rows(cfg)
    pairs = []

    def put(lmdist_name: str, hf_name: str, how: str = "copy", width: int = 0) -> None:
        if lmdist_name in lmdist_names:
            pairs.append((lmdist_name, hf_name, how, width))
        else:  # a bias or a norm's scale left out
            pairs.append((None, hf_name, "zeros" if lmdist_name.endswith(".bias") else "ones", width))

    if kind == "gpt2":
        put("wte.weight", "transformer.wte.weight")
        put("wpe.weight", "transformer.wpe.weight")
        for i in range(cfg.n_layer):
            lm, hf = f"blocks.{i}.", f"transformer.h.{i}."
            for norm in ("ln_1", "ln_2"):
                put(f"{lm}{norm}.weight", f"{hf}{norm}.weight", width=C)
                put(f"{lm}{norm}.bias", f"{hf}{norm}.bias", width=C)
            for lm_linear, hf_linear, out in (("attn.qkv", "attn.c_attn", 3 * C), ("attn.proj", "attn.c_proj", C),
                                              ("mlp.fc", "mlp.c_fc", arch["mlp_width"]), ("mlp.proj", "mlp.c_proj", C)):
                put(f"{lm}{lm_linear}.weight", f"{hf}{hf_linear}.weight", "T")
                put(f"{lm}{lm_linear}.bias", f"{hf}{hf_linear}.bias", width=out)
        put("ln_f.weight", "transformer.ln_f.weight", width=C)
        put("ln_f.bias", "transformer.ln_f.bias", width=C)
    else:
        head_dim, hidden = arch["head_dim"], arch["mlp_width"]
        put("wte.weight", "model.embed_tokens.weight")
        for i in range(cfg.n_layer):
            lm, hf = f"blocks.{i}.", f"model.layers.{i}."
            put(f"{lm}ln_1.weight", f"{hf}input_layernorm.weight", width=C)
            for part, rows in zip("qkv", (q_rows, kv_rows, kv_rows), strict=True):
                put(f"{lm}attn.qkv.weight", f"{hf}self_attn.{part}_proj.weight", part)
                if arch["bias"] or arch["qkv_bias"]:
                    put(f"{lm}attn.qkv.bias", f"{hf}self_attn.{part}_proj.bias", part if arch["qkv_bias"] else "copy",
                        width=rows)
            put(f"{lm}attn.proj.weight", f"{hf}self_attn.o_proj.weight")
            if arch["bias"] or arch["qkv_bias"]:
                put(f"{lm}attn.proj.bias", f"{hf}self_attn.o_proj.bias", width=C)
            if kind == "qwen3":
                put(f"{lm}attn.q_norm.weight", f"{hf}self_attn.q_norm.weight", width=head_dim)
                put(f"{lm}attn.k_norm.weight", f"{hf}self_attn.k_norm.weight", width=head_dim)
            put(f"{lm}ln_2.weight", f"{hf}post_attention_layernorm.weight", width=C)
            for lm_linear, hf_linear, out in (("gate", "gate_proj", hidden), ("up", "up_proj", hidden),
                                              ("proj", "down_proj", C)):
                put(f"{lm}mlp.{lm_linear}.weight", f"{hf}mlp.{hf_linear}.weight")
                if arch["bias"]:
                    put(f"{lm}mlp.{lm_linear}.bias", f"{hf}mlp.{hf_linear}.bias", width=out)
        put("ln_f.weight", "model.norm.weight", width=C)
    if not arch["tie_weights"]:
        put("lm_head.weight", "lm_head.weight")
    return pairs
