"""Exports: `<output_dir>/final/` (and `lmdist export CHECKPOINT --out DIR`), a transformers model folder that
lmdist reads back too.

Layout of an export folder:
    config.json, model.safetensors   transformers' config and weights (transformers_format: GPT2LMHeadModel,
                                     LlamaForCausalLM or Qwen3ForCausalLM, whichever has lmdist's maths)
    generation_config.json           the end-of-text id; padded vocabulary rows suppressed (never sampled)
    tokenizer.json, tokenizer_config.json   for AutoTokenizer, giving lmdist's ids (tokenizer.save_for_transformers)
    lmdist_tokenizer.json            lmdist's tokenizer
    lmdist.json                      lmdist's model fields, and which names model.safetensors is in
A model with no exact transformers equivalent (the LSTM, a ReLU^2 MLP, ...) gets the same folder without
config.json and generation_config.json, its weights in lmdist's names: `save_final` says why, by option.
Exports from before this layout (lmdist's own config.json, a tokenizer/ subfolder) still read.
Pickle-free: safetensors weights, tied weights stored once (transformers ties them again on loading).
"""
from __future__ import annotations

import json
import os

import torch

from lmdist import transformers_format
from lmdist.checkpoint import gather_weights, load_state, weights_origin, without_tied_copies
from lmdist.config import GPT_FIELDS, GPT_SHAPES, TrainConfig, make_config, upgrade_saved
from lmdist.errors import ConfigError, StorageError
from lmdist.files import agree_on_writes, save_safetensors, write_json, writing
from lmdist.models import build_model, vocab_rows
from lmdist.tokenizer import HFTokenizer, Tokenizer, save_for_transformers

MODEL_FIELDS = {
    "lstm": ("embedding_dim", "hidden_dim", "num_layers", "dropout", "tie_weights", "vocab_multiple"),
    "gpt": ("n_layer", "n_head", "n_embd", "dropout", "block_size", "vocab_multiple", "gpt_style", *GPT_FIELDS,
            "rope_theta", *GPT_SHAPES),
    "hf": ("block_size", "vocab_multiple"),  # and hf_config: the export's own config.json
}
LMDIST_FILE = "lmdist.json"


def save_final(accelerator, model, cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[str, str]:
    """Gather the full weights and write `<output_dir>/final/`; returns its path and a line saying what it is.
    Call on every rank."""
    final_dir = os.path.join(cfg.output_dir, "final")
    state = gather_weights(accelerator, model)  # the full weights (shards gathered)
    failure, line = None, ""
    if accelerator.is_main_process:
        try:
            line = write_export(final_dir, state, cfg, tokenizer)
        except StorageError as error:
            failure = error
    agree_on_writes(accelerator, failure, final_dir)  # and a barrier: final/ is complete
    return final_dir, line


def write_export(folder: str, state: dict[str, torch.Tensor], cfg: TrainConfig, tokenizer: Tokenizer) -> str:
    """Write an export of the weights `state` (lmdist's names) into `folder`; returns what it is, in a line."""
    values = cfg.resolved()  # each option as trained: the export does not depend on a style's defaults
    rows = vocab_rows(cfg, tokenizer.vocab_size)  # padded to vocab_multiple
    try:
        hf_config = transformers_format.config(cfg, rows, tokenizer.eos_id)
        line = (f"a transformers {hf_config['architectures'][0]} folder (AutoModelForCausalLM.from_pretrained and "
                "AutoTokenizer.from_pretrained load it)")
    except transformers_format.NotExportable as why:
        hf_config, line = None, f"lmdist's format only, no transformers model: {why}"
    with writing(folder):
        os.makedirs(folder, exist_ok=True)
        if hf_config is None:  # an earlier export's transformers files would describe another model
            for stale in ("config.json", "generation_config.json"):
                if os.path.exists(os.path.join(folder, stale)):
                    os.remove(os.path.join(folder, stale))
        tensors = (transformers_format.to_transformers(cfg, state) if hf_config
                   else without_tied_copies(state))
        save_safetensors(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        save_for_transformers(tokenizer, folder, cfg.block_size)
        if hf_config:
            write_json(os.path.join(folder, "config.json"), hf_config)
            padding = list(range(tokenizer.vocab_size, rows))
            write_json(os.path.join(folder, "generation_config.json"), {
                "bos_token_id": tokenizer.eos_id, "eos_token_id": tokenizer.eos_id,
                **({"suppress_tokens": padding} if padding else {})})
        write_json(os.path.join(folder, LMDIST_FILE), {
            "model": cfg.model, "vocab_size": tokenizer.vocab_size, **{k: values[k] for k in MODEL_FIELDS[cfg.model]},
            "weights": "transformers" if hf_config else "lmdist"})
    return line


def is_export(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, LMDIST_FILE)) or _old_export_config(folder) is not None


def model_values(folder: str) -> tuple[dict, str]:
    """An export's model fields (config values, vocab_size aside) and the folder its lmdist tokenizer is in."""
    if os.path.exists(os.path.join(folder, LMDIST_FILE)):
        with open(os.path.join(folder, LMDIST_FILE)) as f:
            values = json.load(f)
        values.pop("weights")
        tokenizer_dir = folder
    else:
        values, tokenizer_dir = _old_export_config(folder), os.path.join(folder, "tokenizer")
    values.pop("vocab_size")  # the tokenizer's size, not the bpe training field of the same name
    if values["model"] == "hf":
        values["hf_config"] = folder
    return upgrade_saved(values), tokenizer_dir


def read_weights(folder: str) -> dict[str, torch.Tensor]:
    """The weights of an export or a checkpoint folder, in lmdist's names."""
    tensors = _safetensors(folder)
    if not os.path.exists(os.path.join(folder, LMDIST_FILE)):
        return tensors  # a checkpoint, or an export from before transformers folders: lmdist's names
    with open(os.path.join(folder, LMDIST_FILE)) as f:
        saved = json.load(f)
    if saved["weights"] != "transformers":
        return tensors
    cfg = make_config({**model_values(folder)[0], "init_from": None})
    with torch.device("meta"):  # only the names of lmdist's model
        names = set(build_model(cfg, saved["vocab_size"]).state_dict())
    return transformers_format.from_transformers(cfg, tensors, names)


def is_transformers_folder(folder: str) -> bool:
    """A transformers model folder that is not an lmdist export: a config.json with a model_type."""
    path = os.path.join(folder, "config.json")
    if os.path.exists(os.path.join(folder, LMDIST_FILE)) or not os.path.exists(path):
        return False
    with open(path) as f:
        return "model_type" in json.load(f)


def adopt_pretrained(cfg: TrainConfig) -> tuple[TrainConfig, str | None]:
    """With `init_from` a transformers folder: the config with the model fields of its config.json and its
    tokenizer, and a line saying what they are; else `cfg` unchanged and None."""
    if cfg.model == "hf" and cfg.hf_config is None:  # an hf run's export holds its config.json too
        cfg = make_config({**cfg.to_dict(), "hf_config": cfg.init_from})
    if not cfg.init_from or not is_transformers_folder(cfg.init_from):
        return cfg, None
    with open(os.path.join(cfg.init_from, "config.json")) as f:
        hf = json.load(f)
    if cfg.model == "hf":  # the transformers model itself, whatever its family
        fields = {}
    else:
        try:
            fields = transformers_format.fields_from_config(hf, cfg.block_size)
        except transformers_format.NotExportable as why:
            raise ConfigError(f"--init_from {cfg.init_from}: lmdist's GPT cannot hold this model exactly ({why}); "
                              "--model hf trains it as the transformers model itself") from None
    if not os.path.exists(os.path.join(cfg.init_from, "tokenizer.json")):
        raise ConfigError(f"--init_from {cfg.init_from} has no tokenizer.json: its ids would mean nothing to "
                          "another tokenizer; save the model's tokenizer there (tokenizer.save_pretrained)")
    tokens, rows = HFTokenizer.from_folder(cfg.init_from).vocab_size, hf["vocab_size"]
    if rows < tokens:
        raise ConfigError(f"--init_from {cfg.init_from}: its tokenizer has {tokens} tokens and its embedding "
                          f"{rows} rows; every token needs one")
    # all of its rows, those past the tokenizer included (transformers' softmax counts them): ceil(t / r) * r = r
    fields["vocab_multiple"] = rows if rows > tokens else 1
    adopted = make_config({**cfg.to_dict(), **fields, "tokenizer": cfg.init_from})
    changed = ", ".join(f"{name} {value}" for name, value in fields.items() if getattr(cfg, name) != value)
    trained_as = ("itself (--model hf)" if cfg.model == "hf"
                  else f"lmdist's gpt with {changed or 'the configured fields'}")
    return adopted, (f"init_from: {cfg.init_from} is a transformers {hf.get('architectures', [hf['model_type']])[0]}: "
                     f"trained as {trained_as}, and its tokenizer")


def _safetensors(folder: str) -> dict[str, torch.Tensor]:
    """A folder's weights: model.safetensors, or the shards its index names (transformers' large models)."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.exists(index):
        return load_file(os.path.join(folder, "model.safetensors"))
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return {name: tensor for shard in shards for name, tensor in load_file(os.path.join(folder, shard)).items()}


def init_weights(module: torch.nn.Module, folder: str, cfg: TrainConfig) -> str:
    """`init_from`: load `folder`'s weights (a checkpoint, an export or a transformers folder, which
    adopt_pretrained has configured `cfg` for) into `module`; returns a line saying what was loaded, and
    from where."""
    file = os.path.join(folder, "model.safetensors")
    if is_transformers_folder(folder):
        shapes = {name: tensor.shape for name, tensor in module.state_dict().items()}
        rows = {"wpe.weight": shapes["wpe.weight"][0]} if "wpe.weight" in shapes else {}  # block_size positions
        weights = transformers_format.from_transformers(cfg, _safetensors(folder), set(shapes), rows)
    else:
        weights = read_weights(folder)
    state = load_state(module, weights, file)
    origin = weights_origin(folder)
    return (f"init_from: loaded {len(state)} tensors ({sum(t.numel() for t in state.values()):,} parameters) "
            f"from {file}{f' ({origin})' if origin else ''}")


def _old_export_config(folder: str) -> dict | None:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        values = json.load(f)
    return values if "model" in values and "model_type" not in values else None
