"""Any transformers causal LM as lmdist's model (`--model hf`): `AutoModelForCausalLM.from_config` on a
transformers config (`hf_config`: a config.json, or a model folder holding one), trained by the same loop.

Contract: `forward(idx)` gives next-token logits (batch, time, vocab) as lmdist's GPT does; the parameters
are transformers' names under `hf.`, so an export strips the prefix and is that transformers model again
(transformers_format); the repeated layers are the model's own `_no_split_modules` classes, which are the
FSDP units (sharding.unit_names) and hold Muon's matrices. The config decides the architecture, its
initialisation (`initializer_range`) and its dropout; lmdist sets its vocab_size to the tokenizer's rows.
transformers is imported only here, and only for `--model hf`.
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from lmdist.errors import ConfigError
from lmdist.models.parameters import count_parameters

INSTALL = 'pip install "lmdist[hf]"'
HF_PREFIX = "hf."  # the transformers model's parameter names under HFCausalLM
KEPT_CONFIG = "hf_config.json"  # in output_dir: the config the run trained
# config keys that change no training: what generation or outputs do, and transformers' bookkeeping
RUNTIME_KEYS = ("use_cache", "output_attentions", "output_hidden_states", "return_dict", "torchscript", "dtype",
                "torch_dtype", "transformers_version", "_name_or_path", "architectures")


def load_config(path: str, vocab_size: int | None = None):
    """The transformers config at `path` (a config.json, or a folder holding one) for a causal LM, with
    `vocab_size` rows when given."""
    try:
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        raise ConfigError(f"--model hf builds a transformers model, and transformers is not installed: {INSTALL}") \
            from None
    file = config_file(path)
    if not os.path.isfile(file):
        raise ConfigError(f"hf_config {path}: no such config.json; give a transformers config file or model folder")
    try:
        config = AutoConfig.from_pretrained(file)
    except (ValueError, KeyError, OSError) as e:  # e.g. a model_type this transformers does not know
        raise ConfigError(f"hf_config {path}: transformers cannot read it ({e})") from None
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ConfigError(f"hf_config {path}: model_type {config.model_type!r} has no causal language model in "
                          "transformers (AutoModelForCausalLM); give a decoder config such as llama, qwen3 or gpt2")
    if vocab_size is not None:
        config.vocab_size = vocab_size
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # another tokenizer's ids: lmdist's are set
            if isinstance(getattr(config, name, None), int) and getattr(config, name) >= vocab_size:  # on export
                setattr(config, name, None)
    return config


def check_block_size(config, block_size: int, source: str) -> None:
    longest = getattr(config, "max_position_embeddings", None)
    if longest is not None and block_size > longest:
        raise ConfigError(f"block_size {block_size} is longer than hf_config {source}'s max_position_embeddings "
                          f"({longest}): lower block_size, or raise max_position_embeddings in the config")


def keep_config(path: str, output_dir: str) -> None:
    """Copy hf_config into output_dir (KEPT_CONFIG), where a checkpoint's eval, generate and export read it: the
    path the run was given may be relative to its launch folder, moved or edited later."""
    from lmdist.files import write_json

    with open(config_file(path)) as f:
        write_json(os.path.join(output_dir, KEPT_CONFIG), json.load(f))


def kept_config(checkpoint_dir: str) -> str | None:
    """The copy of hf_config its run kept, for a checkpoint (output_dir/checkpoints/step_N); None if none."""
    path = os.path.join(checkpoint_dir, os.pardir, os.pardir, KEPT_CONFIG)
    return path if os.path.isfile(path) else None


def config_file(path: str) -> str:
    """hf_config's config.json: the file itself, or the one in the folder."""
    return path if os.path.isfile(path) else os.path.join(path, "config.json")


def export_config(path: str, vocab_rows: int, eos_id: int | None, own_tokenizer: bool) -> dict:
    """config.json of a trained model of hf_config `path` with `vocab_rows` rows: the end-of-text id is lmdist's
    tokenizer's, and so is the beginning-of-text id unless the tokenizer is a pretrained one (`own_tokenizer`)."""
    config = load_config(path, vocab_rows)
    config.architectures = [class_name(config)]
    config.eos_token_id = eos_id
    if not own_tokenizer:
        config.bos_token_id, config.pad_token_id = eos_id, None
    return config.to_diff_dict()


def recorded_config(path: str) -> dict:
    """The config at `path` as a checkpoint records it, to refuse a relaunch on an edited file: every value
    but those lmdist sets (vocab_size, token ids) and transformers' bookkeeping."""
    values = json.loads(load_config(path).to_json_string(use_diff=False))
    for name in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", *RUNTIME_KEYS):
        values.pop(name, None)
    return values


def class_name(config) -> str:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]


class HFCausalLM(nn.Module):
    """A transformers causal LM behind lmdist's model interface."""

    def __init__(self, config, block_size: int, source: str):
        from transformers import AutoModelForCausalLM

        super().__init__()
        check_block_size(config, block_size, source)
        try:  # transformers picks torch's fused sdpa attention where the model supports it (Gemma 2: eager)
            self.hf = AutoModelForCausalLM.from_config(config)
        except (ValueError, TypeError, KeyError) as e:  # transformers' own check of the config's values
            raise ConfigError(f"hf_config {source}: transformers cannot build this model ({e})") from None
        self.block_size = block_size
        self.config = self.hf.config
        if self.hf.device.type != "meta":
            self._check_causal(source)

    @torch.no_grad()
    def _check_causal(self, source: str) -> None:
        """Refuse a model whose predictions see later tokens (an encoder that AutoModelForCausalLM also maps,
        e.g. BERT without is_decoder): its loss would not be a language model's. One forward of 8 tokens."""
        training, ids = self.training, torch.arange(8).unsqueeze(0) % self.config.vocab_size
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % self.config.vocab_size
        self.eval()
        # not bitwise: a kernel may block a longer row differently; a leak moves logits by orders more
        leaks = not torch.allclose(self(ids)[:, :-1], self(changed)[:, :-1], rtol=0, atol=1e-6)
        self.train(training)
        if leaks:
            raise ConfigError(f"hf_config {source}: this {type(self.hf).__name__} lets each position see later "
                              "tokens, so it is not a causal language model: give a decoder config (for BERT-like "
                              "models set is_decoder: true)")

    @property
    def layer_classes(self) -> set[str]:
        """The model's repeated layers, as transformers names them (`_no_split_modules`)."""
        return set(self.hf._no_split_modules or ())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (batch, time) -> next-token logits (batch, time, vocab); no key/value cache in training."""
        return self.hf(input_ids=idx, use_cache=False).logits

    def hidden_matrices(self) -> list[nn.Parameter]:
        """The 2-D weights inside the repeated layers (attention and MLP projections): Muon's parameters."""
        layers = [m for m in self.hf.modules() if type(m).__name__ in self.layer_classes]
        return [p for layer in layers for p in layer.parameters() if p.dim() == 2]

    def flops_per_token(self) -> float:
        """The PaLM convention, as for lmdist's GPT: 6N (N without the embedding lookups: every nn.Embedding
        but one that is the head too) plus 12 x layers x query heads' width x block_size for attention."""
        head = self.hf.get_output_embeddings()
        lookups = [m.weight for m in self.hf.modules()
                   if isinstance(m, nn.Embedding) and (head is None or m.weight is not head.weight)]
        config = self.config.get_text_config()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        attention_width = config.num_attention_heads * head_dim
        n = count_parameters(self) - sum(w.numel() for w in lookups)
        return 6 * n + 12 * config.num_hidden_layers * attention_width * self.block_size


def describe(config, source: str) -> str:
    """The model line of the plan."""
    text = config.get_text_config()
    head = "tied head" if getattr(text, "tie_word_embeddings", False) else "untied head"
    return (f"model: hf {class_name(config)} from {source}: {text.num_hidden_layers} layers x "
            f"{text.num_attention_heads} heads x {text.hidden_size}, {head}")
