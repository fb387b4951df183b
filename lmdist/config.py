"""The one typed training config: defaults, YAML file, command-line flags, validation, help.

Precedence is defaults < `--config FILE.yaml` < `--FIELD VALUE` flags. Every value is coerced to its
field's type (strictly, by lmdist.flags, the parser of every lmdist command) and checked before any
process group or data work starts, so a typo costs a second, not a queued job. A renamed field
(RENAMED) is refused as a flag, naming its new name; saved configs are read through `upgrade_saved`.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from lmdist import flags, trackers
from lmdist.errors import ConfigError
from lmdist.files import atomic_open
from lmdist.flags import option as _f  # short: one readable line per field

TOKENIZER_NAMES = ("byte", "char", "word", "bpe")

# The GPT architecture presets (`gpt_style`): each field left unset (None) takes its style's value.
# `gpt2` is lmdist's GPT before the presets existed, parameter for parameter; `modern` is the small-model
# recipe of the modded-nanogpt speedrun and nanochat (docs/gpt.md says what each part buys).
GPT_STYLES: dict[str, dict[str, Any]] = {
    "gpt2": {"position": "learned", "norm": "layernorm", "norm_scale": True, "qk_norm": False, "mlp": "gelu",
             "bias": True, "zero_init": False, "tie_weights": True},
    "modern": {"position": "rope", "norm": "rmsnorm", "norm_scale": True, "qk_norm": True, "mlp": "swiglu",
               "bias": False, "zero_init": True, "tie_weights": False},
}
GPT_FIELDS = tuple(GPT_STYLES["gpt2"])  # the fields a style sets
GPT_SHAPES = ("n_kv_head", "head_dim", "mlp_width", "norm_eps", "qkv_bias")  # set by no style; a pretrained model's


def swiglu_width(n_embd: int) -> int:
    """SwiGLU's default hidden units: three matrices of n_embd x h hold what GELU's two of n_embd x 4n_embd hold
    when h = 8/3 n_embd, rounded to a multiple of 8 (as Llama rounds to its `multiple_of`)."""
    return max(8, round(8 * n_embd / 3 / 8) * 8)


def default_mlp_width(mlp: str, n_embd: int) -> int:
    return swiglu_width(n_embd) if mlp == "swiglu" else 4 * n_embd


@dataclass
class TrainConfig:
    # model
    model: Literal["lstm", "gpt", "hf"] = _f("lstm", "`lstm` (the lesson's LSTM language model), `gpt` (decoder-only transformer) or `hf` (the transformers causal LM of hf_config; needs lmdist[hf])", "model")
    hf_config: str | None = _f(None, "--model hf: the transformers config it builds (a config.json, or a model folder holding one), its vocab_size set to the tokenizer's; default: init_from's folder", "model")
    embedding_dim: int = _f(256, "LSTM: token embedding size", "model")
    hidden_dim: int = _f(256, "LSTM: hidden size of each layer (with tie_weights the last layer outputs embedding_dim)", "model")
    num_layers: int = _f(2, "LSTM: number of stacked LSTM layers", "model")
    tie_weights: bool | None = _f(None, "share the input embedding with the output layer (default: shared for the LSTM and the gpt2 style, not for modern)", "model")
    n_layer: int = _f(4, "GPT: number of transformer blocks", "model")
    n_head: int = _f(4, "GPT: attention heads per block (must divide n_embd)", "model")
    n_embd: int = _f(128, "GPT: embedding and residual width", "model")
    gpt_style: Literal["gpt2", "modern"] = _f("modern", "GPT: the architecture preset, which the fields below override one by one: `gpt2` (learned positions, LayerNorm, GELU, biases, tied head: GPT-2 of 2019) or `modern` (RoPE, RMSNorm, QK-norm, SwiGLU, no biases, zero-initialised projections and head, untied head)", "model")
    position: Literal["learned", "rope"] | None = _f(None, "GPT: `learned` position embeddings or `rope` (rotary, relative); default: the gpt_style's", "model")
    rope_theta: float = _f(10000.0, "GPT: RoPE's base period (larger: slower-turning dimensions for longer contexts)", "model")
    norm: Literal["layernorm", "rmsnorm"] | None = _f(None, "GPT: `layernorm` or `rmsnorm`, before each block's attention and MLP and before the head; default: the gpt_style's", "model")
    norm_scale: bool | None = _f(None, "GPT: give each norm a learned scale (and LayerNorm a bias when `bias`); default: the gpt_style's", "model")
    qk_norm: bool | None = _f(None, "GPT: RMS-normalise each head's queries and keys before attention (bounded attention logits); default: the gpt_style's", "model")
    mlp: Literal["gelu", "gelu_tanh", "relu2", "swiglu"] | None = _f(None, "GPT: the MLP, `gelu`, `gelu_tanh` (its tanh approximation, pretrained GPT-2's) or `relu2` (ReLU squared) with 4 x n_embd hidden units, or `swiglu` with 8/3 x n_embd (rounded to a multiple of 8), the same parameters; default: the gpt_style's", "model")
    bias: bool | None = _f(None, "GPT: biases in the output projections, the MLP and the norms (the query/key/value projection never has one); default: the gpt_style's", "model")
    zero_init: bool | None = _f(None, "GPT: start each block's output projections (and an untied head) at zero, so every block starts as the identity; default: the gpt_style's", "model")
    n_kv_head: int | None = _f(None, "GPT: key/value heads per block, each shared by n_head / n_kv_head query heads (grouped-query attention, as in Llama 3 and Qwen3); default: n_head", "model")
    head_dim: int | None = _f(None, "GPT: the width of each attention head; default: n_embd / n_head", "model")
    mlp_width: int | None = _f(None, "GPT: the MLP's hidden units; default: the mlp's (4 x n_embd, SwiGLU 8/3 x n_embd)", "model")
    norm_eps: float | None = _f(None, "GPT: the epsilon inside every norm; default: torch's (1e-5 for LayerNorm, float32's machine epsilon for RMSNorm)", "model")
    qkv_bias: bool = _f(False, "GPT: a bias on the query/key/value projection (pretrained GPT-2 and Qwen2 have one)", "model")
    dropout: float = _f(0.1, "dropout probability in both models (0 turns it off)", "model")
    block_size: int = _f(128, "tokens per training sequence (the context length)", "model")
    vocab_multiple: int = _f(1, "round the model's vocabulary (embedding and output rows) up to a multiple of this: 64 suits GPU tensor cores (GPT-2's 50257 -> 50304); the extra rows are never targets and never sampled", "model")
    # data
    dataset: str = _f("builtin", "`builtin` (bundled corpus, no download), a local json/jsonl/csv/parquet or text file (any other file without NUL bytes: .txt, .md, .py, ...), folder or glob, a `save_to_disk` folder, or a hub dataset name", "data")
    mixture: str | None = _f(None, "train on several sources in proportion instead of `dataset`: a YAML file listing {dataset, weight, name, text_column, dataset_config}, or inline `SPEC:WEIGHT,SPEC:WEIGHT`; each source keeps its own validation split, reported as val/<name>/loss", "data")
    dataset_config: str | None = _f(None, "hub dataset configuration name (e.g. `wikitext-2-raw-v1`)", "data")
    text_column: str = _f("text", "column holding the text", "data")
    val_dataset: str | None = _f(None, "validation data (same forms as `dataset`); default: the source's `validation` (or `valid`, or `test`) split, else the last val_fraction of the training data", "data")
    val_fraction: float = _f(0.05, "fraction of the training data held out for validation when there is no validation split: the last bytes of text files, else the last rows", "data")
    cache_dir: str | None = _f(None, "HuggingFace datasets cache folder (default: the datasets library's own)", "data")
    tokens_dir: str | None = _f(None, "folder of the prepared token shards, one subfolder per data + tokenizer, shared by every run on the same data (`lmdist prepare` fills it ahead of training); default: lmdist-tokens in the datasets cache", "data")
    tokenizer: str = _f("byte", "`byte`, `char`, `word` (vocabulary from the training split), `bpe` (byte-level BPE trained on the training split), or a local HuggingFace tokenizer folder", "data")
    bpe_vocab_size: int = _f(4096, "bpe: vocabulary size to train (the model's vocabulary is the tokenizer's, rounded up to vocab_multiple)", "data")
    bpe_sample_bytes: int = _f(100_000_000, "bpe: train on a seeded sample of about this many bytes of the training text (all of it when smaller)", "data")
    min_freq: int = _f(1, "char/word: keep symbols seen at least this often in training; rarer ones become <unk>", "data")
    streaming: bool = _f(False, "read the training data as a stream (HF IterableDataset) split across ranks, for corpora too large for local disk; needs max_steps, val_dataset, and a byte or folder tokenizer", "data")
    # optimisation
    epochs: int = _f(1, "passes over the training data, each in a fresh seeded order (when max_steps is set, it decides the length instead)", "optimisation")
    max_steps: int | None = _f(None, "train exactly this many optimizer steps, over as many epochs as they take (overrides epochs); default: epochs whole epochs", "optimisation")
    batch_size: int = _f(32, "sequences per process per micro-step", "optimisation")
    grad_accum: int = _f(1, "micro-steps accumulated into each optimizer step", "optimisation")
    optimizer: Literal["adamw", "adam", "sgd", "muon"] = _f("adamw", "`adamw`, `adam`, `sgd` (with momentum beta1), or `muon`: torch.optim.Muon on the 2-D weight matrices inside the blocks (or LSTM layers) and fused AdamW (lr, beta1, beta2) on the embeddings, the head, norms and biases", "optimisation")
    lr: float = _f(3e-3, "peak learning rate (with muon: of the AdamW parameters)", "optimisation")
    muon_lr: float = _f(0.02, "muon: peak learning rate of the Muon matrices (scaled by sqrt(max(1, rows/columns)) per matrix, as in Keller Jordan's Muon); the schedule scales it as it scales lr", "optimisation")
    muon_momentum: float = _f(0.95, "muon: Nesterov momentum of the Muon matrices", "optimisation")
    min_lr: float | None = _f(None, "learning rate at the end of the schedule (default: lr / 10)", "optimisation")
    warmup_steps: int = _f(20, "optimizer steps of linear warm-up from 0 to lr", "optimisation")
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = _f("cosine", "after warm-up: `cosine` or `linear` decay from lr to min_lr, `constant`, or `wsd` (warm-up, stable at lr, then linear decay to min_lr over the last decay_fraction of the steps)", "optimisation")
    decay_fraction: float = _f(0.4, "wsd: the fraction of the run's steps, at its end, over which lr decays to min_lr", "optimisation")
    weight_decay: float = _f(0.01, "decoupled weight decay on weight matrices and embeddings (never on biases or norm weights); with muon on both optimizers' matrices", "optimisation")
    beta1: float = _f(0.9, "Adam beta1 (SGD momentum)", "optimisation")
    beta2: float = _f(0.99, "Adam beta2", "optimisation")
    grad_clip: float = _f(1.0, "clip the global gradient norm to this value on optimizer steps (0 = no clipping)", "optimisation")
    seed: int = _f(1337, "random seed for initialisation, shuffling and dropout", "optimisation")
    # performance
    threads: int | None = _f(None, "torch threads per process (default: available cores / processes on this node)", "performance")
    compile: bool = _f(False, "torch.compile the model and the loss: faster steps after a one-off compile (tens of seconds; worth it for long runs, and on GPUs)", "performance")
    num_workers: int | None = _f(None, "DataLoader worker processes per rank (default: 0 on CPU, where every core trains; 2 per GPU)", "performance")
    peak_tflops: float | None = _f(None, "peak TFLOP/s of one process, the denominator of `mfu` (default: the GPU's datasheet bf16 rate under bf16/fp16 mixed precision, else a matmul measured once per machine and kept in lmdist's cache; 0: no mfu)", "performance")
    profile_steps: int = _f(0, "record this many optimizer steps with torch.profiler on every rank: a trace and a table of the costliest ops in output_dir/profile/ (0 = off)", "performance")
    profile_start: int = _f(10, "optimizer steps of this launch before the profiled ones (compilation and warm-up stay out)", "performance")
    # evaluation and logging
    eval_every: int = _f(100, "evaluate every this many optimizer steps (also at each epoch end and the last step)", "logging")
    eval_batches: int = _f(0, "validation batches per evaluation (0 = the whole validation set)", "logging")
    log_every: int = _f(10, "log training metrics every this many optimizer steps (and at the last step)", "logging")
    output_dir: str = _f("runs/lmdist", "folder for config.yaml, run.json, metrics.jsonl, the tokenizer and W&B files", "logging")
    report_to: str = _f("wandb", "the trackers that get every log row and the config besides metrics.jsonl, comma-separated: `wandb`, `tensorboard` (in output_dir/tensorboard), `mlflow` (to MLFLOW_TRACKING_URI, else output_dir/mlflow.db), any other name accelerate's `log_with` takes (comet_ml, aim, clearml, dvclive, swanlab, trackio), or `none`", "logging")
    run_name: str | None = _f(None, "W&B (and MLflow) run name (default: the output_dir folder name)", "logging")
    wandb_project: str = _f("lmdist", "W&B project; also the MLflow experiment (unless MLFLOW_EXPERIMENT_NAME) and other trackers' project", "logging")
    wandb_mode: Literal["auto", "online", "offline", "disabled"] = _f("auto", "`auto` (online when W&B credentials are configured, else offline), `online`, `offline` or `disabled`", "logging")
    wandb_init_timeout: float = _f(30.0, "seconds to wait for W&B to start online before falling back to offline logging", "logging")
    wandb_tags: str | None = _f(None, "W&B tags of the run, comma-separated (e.g. `baseline,muon`)", "logging")
    wandb_artifact: bool = _f(False, "at the end, upload final/ to W&B as a model artifact `model-<run id>`", "logging")
    sample_prompts: str = _f("The |Once upon a time", "prompts the run continues at each sampling step, separated by `|` (an empty prompt starts from end-of-text); the rows go to samples.jsonl and a W&B Table", "logging")
    sample_tokens: int = _f(64, "tokens generated per sample prompt (0 = no samples)", "logging")
    sample_every: int | None = _f(None, "take samples every this many optimizer steps and at the last step (default: at each evaluation; 0 = never)", "logging")
    sample_temperature: float = _f(0.8, "temperature of the samples' draws from the top 50 tokens (0 = greedy)", "logging")
    # checkpoints
    save_every: int = _f(200, "save a checkpoint every this many optimizer steps (and at the last step)", "checkpoints")
    keep_last: int = _f(2, "complete checkpoints kept (older ones are deleted once a newer one is complete)", "checkpoints")
    keep_best: bool = _f(False, "also keep the checkpoint with the lowest val/loss (every checkpoint is then evaluated)", "checkpoints")
    resume: str = _f("auto", "`auto` (the newest complete checkpoint in output_dir, if any), `never` (refuse a used output_dir), or a checkpoint folder", "checkpoints")
    init_from: str | None = _f(None, "start a new run from these weights only (a checkpoint, a final/ export, or a transformers GPT-2, Llama, Qwen2 or Qwen3 folder, whose architecture and tokenizer it takes too): no optimizer, counters or run id; relaunching the same command continues that run from its checkpoints", "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str) -> None:
        with atomic_open(path) as f:
            yaml.safe_dump(self.to_dict(), f, sort_keys=False)

    @property
    def effective_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def report_names(self) -> list[str]:
        """report_to's trackers, each once, in order; none for `none`."""
        names = list(dict.fromkeys(name.strip() for name in self.report_to.split(",") if name.strip()))
        return [] if names == ["none"] else names

    @property
    def architecture(self) -> dict[str, Any]:
        """The model's resolved shape options: for a GPT each of GPT_FIELDS (set, else its gpt_style's),
        rope_theta and GPT_SHAPES (set, else their defaults); for the LSTM tie_weights (default shared)."""
        if self.model == "hf":  # hf_config's
            return {}
        if self.model != "gpt":
            return {"tie_weights": True if self.tie_weights is None else self.tie_weights}
        style = GPT_STYLES[self.gpt_style]
        chosen = {name: style[name] if getattr(self, name) is None else getattr(self, name) for name in GPT_FIELDS}
        return {**chosen, "rope_theta": self.rope_theta, "n_kv_head": self.n_kv_head or self.n_head,
                "head_dim": self.head_dim or self.n_embd // self.n_head,
                "mlp_width": self.mlp_width or default_mlp_width(chosen["mlp"], self.n_embd),
                "norm_eps": self.norm_eps, "qkv_bias": self.qkv_bias}

    def resolved(self) -> dict[str, Any]:
        """Every field, the architecture's as `architecture` resolves them: what a run trains, for comparing two
        runs whose configs spell it differently (a default left unset, or a style's value given explicitly)."""
        return {**self.to_dict(), **self.architecture}


RENAMED = {"vocab_size": "bpe_vocab_size"}  # old field name -> new: saved configs still load, flags are told


def upgrade_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A config written by an older lmdist (a checkpoint's, a run's config.yaml, a --config file) in today's
    field names: call it wherever a saved config is read, so that an unchanged run compares equal on resume."""
    upgraded = dict(saved)
    for old, new in RENAMED.items():
        if old in upgraded:
            if new in upgraded:
                raise ConfigError(f"{old!r} was renamed {new!r}, and both are given: keep {new!r}")
            upgraded[new] = upgraded.pop(old)
    if "gpt_style" not in upgraded and upgraded.get("model") == "gpt" and upgraded.keys() >= _WRITTEN_BEFORE_STYLES:
        upgraded["gpt_style"] = "gpt2"  # a whole saved model config from before the presets: that GPT was gpt2's
    return upgraded


# Fields every saved model config (a run's config, a checkpoint's, final/config.json) has held since the GPT
# existed; a hand-written --config file without gpt_style rarely names them all, and takes the default style.
_WRITTEN_BEFORE_STYLES = frozenset({"n_layer", "n_head", "n_embd", "dropout", "tie_weights"})


# ----------------------------------------------------------------------------- parsing

def load_config(argv: list[str], usage: list[str] | None = None) -> TrainConfig:
    """The config for a command line; `-h`/`--help` prints `usage` (train.py's by default) and every field, and
    exits 0."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text(usage), flush=True)  # a closed pipe (`--help | head`) fails here, not at exit
        raise SystemExit(0)
    return parse_args(argv)


def parse_args(argv: list[str]) -> TrainConfig:
    """Build the config from `--config FILE` and `--FIELD VALUE` flags; raise ConfigError on any problem."""
    flags = TRAIN_FLAGS.split(argv)
    values: dict[str, Any] = {}
    config_file = flags.pop("config", None)
    if config_file is not None:
        values.update(_read_yaml(config_file))
    values.update(flags)
    return make_config(values)


def make_config(values: dict[str, Any], source: str = "flag") -> TrainConfig:
    """Coerce and validate `values` (field name -> raw value) into a TrainConfig."""
    return TRAIN_FLAGS.make(values, source)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last silently):
    a --config file is written, not appended to, so a second value is a mistake, not an override."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a key may override what a merge (<<) brings
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, Hashable):
                continue  # SafeLoader itself refuses it, with its own message
            if key in seen:
                raise ConfigError(f"{key!r} is given twice (lines {seen[key]} and {line}): keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of field: value, got {type(data).__name__}")
    try:
        data = upgrade_saved(data)  # an older run's config.yaml is a --config file too
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from None
    for name in data:
        if name not in FIELDS:
            raise ConfigError(f"--config {path}: unknown field {name!r}{TRAIN_FLAGS.suggestion(str(name))}")
    return data


# ----------------------------------------------------------------------------- validation

def validate(cfg: TrainConfig) -> None:
    """Reject impossible values, naming the field and what would be valid."""
    def need(ok: bool, name: str, what: str) -> None:
        flags.need(ok, cfg, name, what)

    for name in ("embedding_dim", "hidden_dim", "num_layers", "n_layer", "n_head", "n_embd", "epochs",
                 "batch_size", "grad_accum", "eval_every", "log_every", "min_freq", "vocab_multiple"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    for name in ("max_steps", "threads"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 1, name, "must be at least 1 (or none)")
    need(cfg.head_dim is not None or cfg.n_embd % cfg.n_head == 0, "n_embd",
         f"must be divisible by n_head ({cfg.n_head}), or give head_dim")
    for name in ("n_kv_head", "head_dim", "mlp_width"):
        need(getattr(cfg, name) is None or getattr(cfg, name) >= 1, name, "must be at least 1 (or none)")
    need(cfg.n_kv_head is None or cfg.n_head % cfg.n_kv_head == 0, "n_kv_head",
         f"must divide n_head ({cfg.n_head}): each key/value head serves a whole group of query heads")
    need(cfg.norm_eps is None or cfg.norm_eps > 0, "norm_eps", "must be positive (or none: torch's default)")
    for name in GPT_SHAPES:
        need(cfg.model == "gpt" or getattr(cfg, name) in (None, False), name,
             f"shapes a GPT only: leave it out with --model {cfg.model}")
    need(cfg.block_size >= 2, "block_size", "must be at least 2 (a sequence needs an input and a target)")
    need(0 <= cfg.dropout < 1, "dropout", "must be in [0, 1)")
    for name in GPT_FIELDS[:-1]:  # the LSTM ties its head too
        need(cfg.model == "gpt" or getattr(cfg, name) is None, name,
             f"shapes a GPT only: leave it out with --model {cfg.model}")
    for name in ("n_layer", "n_head", "n_embd", "embedding_dim", "hidden_dim", "num_layers", "dropout"):
        need(cfg.model != "hf" or getattr(cfg, name) == _DEFAULTS[name], name,
             "--model hf builds its transformers config as it is (num_hidden_layers, hidden_size, attention_dropout "
             "...): set it there, or leave the flag out")
    need(cfg.model != "hf" or cfg.tie_weights is None, "tie_weights",
         "--model hf ties the head as its config's tie_word_embeddings says: set it there, or leave it out")
    need(cfg.model == "hf" or cfg.hf_config is None, "hf_config",
         "only --model hf builds a transformers config: add --model hf, or leave it out")
    need(cfg.model != "hf" or bool(cfg.hf_config or cfg.init_from), "hf_config",
         "--model hf needs a transformers config: --hf_config CONFIG.json (or a model folder), or --init_from a "
         "transformers model folder")
    need(cfg.rope_theta > 0, "rope_theta", "must be positive")
    head_dim = cfg.head_dim or cfg.n_embd // cfg.n_head
    need(cfg.model != "gpt" or cfg.architecture["position"] != "rope" or head_dim % 2 == 0,
         "position", f"rope rotates pairs of dimensions: the head width ({head_dim}) must be even")
    # numpy's seed range, checked here so that every rank refuses it (numpy would fail on rank 1 alone)
    need(0 <= cfg.seed <= 2**32 - 1, "seed", "must be between 0 and 2**32 - 1 (4294967295)")
    need(0 < cfg.val_fraction < 1, "val_fraction", "must be between 0 and 1")
    if cfg.mixture is not None:
        from lmdist.mixture import parse_mixture

        parse_mixture(cfg.mixture)
        need(cfg.dataset == "builtin", "mixture", "replaces --dataset: give one of them (a mixture lists its datasets)")
        need(cfg.val_dataset is None, "mixture", "validates each source on its own split: drop --val_dataset")
        need(not cfg.streaming, "mixture", "reads prepared shards: drop --streaming true")
    need(cfg.bpe_sample_bytes >= 1, "bpe_sample_bytes", "must be at least 1")
    need(cfg.bpe_vocab_size >= 260, "bpe_vocab_size", "must be at least 260 (byte-level BPE starts from 256 bytes)")
    need(cfg.lr >= 0, "lr", "must be non-negative")
    need(cfg.min_lr is None or 0 <= cfg.min_lr <= cfg.lr, "min_lr", f"must be between 0 and lr ({cfg.lr})")
    need(cfg.warmup_steps >= 0, "warmup_steps", "must be non-negative")
    need(cfg.weight_decay >= 0, "weight_decay", "must be non-negative")
    need(cfg.muon_lr >= 0, "muon_lr", "must be non-negative")
    need(cfg.optimizer != "muon" or cfg.lr > 0, "lr", "must be positive with --optimizer muon: the schedule scales "
         "muon_lr by lr's factor")
    need(0 <= cfg.muon_momentum < 1, "muon_momentum", "must be in [0, 1)")
    need(0 <= cfg.decay_fraction <= 1, "decay_fraction", "must be between 0 and 1")
    need(0 <= cfg.beta1 < 1, "beta1", "must be in [0, 1)")
    need(0 <= cfg.beta2 < 1, "beta2", "must be in [0, 1)")
    need(cfg.grad_clip >= 0, "grad_clip", "must be non-negative (0 turns clipping off)")
    need(cfg.num_workers is None or cfg.num_workers >= 0, "num_workers", "must be non-negative (or none)")
    need(cfg.peak_tflops is None or cfg.peak_tflops >= 0, "peak_tflops", "must be non-negative (0 = no mfu)")
    need(cfg.profile_steps >= 0, "profile_steps", "must be non-negative (0 = no profile)")
    need(cfg.profile_start >= 0, "profile_start", "must be non-negative")
    need(cfg.eval_batches >= 0, "eval_batches", "must be non-negative (0 = the whole validation set)")
    need(cfg.wandb_init_timeout > 0, "wandb_init_timeout", "must be positive")
    need(cfg.sample_tokens >= 0, "sample_tokens", "must be 0 (no samples) or more")
    need(cfg.sample_every is None or cfg.sample_every >= 0, "sample_every", "must be 0 (never) or more steps")
    need(cfg.sample_temperature >= 0, "sample_temperature", "must be 0 (greedy) or more")
    need(cfg.wandb_tags is None or all(tag.strip() for tag in cfg.wandb_tags.split(",")), "wandb_tags",
         "names an empty tag: separate tags with single commas")
    trackers.check(cfg)
    need(cfg.save_every >= 1, "save_every", "must be at least 1")
    need(cfg.keep_last >= 1, "keep_last", "must be at least 1 (the newest complete checkpoint is always kept)")
    need(cfg.resume in ("auto", "never") or os.path.isdir(cfg.resume), "resume",
         "must be auto, never or an existing checkpoint folder")
    need(cfg.init_from is None or any(os.path.isfile(os.path.join(cfg.init_from, name))
                                      for name in ("model.safetensors", "model.safetensors.index.json")),
         "init_from", "must be a checkpoint, an export or a transformers model folder holding model.safetensors")
    need(bool(cfg.text_column), "text_column", "must name a column")
    need(bool(cfg.output_dir), "output_dir", "must name a folder")
    need(cfg.tokenizer in TOKENIZER_NAMES or os.path.isfile(os.path.join(cfg.tokenizer, "tokenizer.json")), "tokenizer",
         f"must be one of {', '.join(TOKENIZER_NAMES)} or a folder holding a HuggingFace tokenizer.json")


# ----------------------------------------------------------------------------- help

TRAIN_USAGE = [
    "usage: accelerate launch train.py [--config FILE.yaml] [--FIELD VALUE ...]",
    "       python train.py ... | torchrun --nproc_per_node N train.py ...",
    "       lmdist train ... | accelerate launch -m lmdist.train ... | torchrun ... -m lmdist.train ...",
]


def help_text(usage: list[str] | None = None) -> str:
    """`usage` (train.py's by default), then every field with its type, default and meaning, grouped as in
    docs/config.md."""
    return TRAIN_FLAGS.help_text([
        *(usage or TRAIN_USAGE), "",
        "Values come from the defaults, then --config (a YAML mapping of field: value, e.g. a run's",
        "config.yaml), then flags. Booleans take true/false (or --FIELD / --noFIELD).",
    ])


def type_name(name: str) -> str:
    return TRAIN_FLAGS.type_name(name)


def markdown_table() -> str:
    """docs/config.md's table of fields (kept in sync by a test)."""
    return TRAIN_FLAGS.markdown_table()


TRAIN_FLAGS = flags.Flags(TrainConfig, validate, extra=("config",), renamed=RENAMED)
FIELDS = TRAIN_FLAGS.fields
_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TrainConfig)}
