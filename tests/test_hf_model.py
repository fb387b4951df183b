"""`--model hf`: a transformers causal LM (a tiny Llama config) trained by lmdist's loop: 2 ranks, accumulation
and FSDP on CPU train the one-process model; a stopped run relaunched is bitwise the unstopped one; its export
is the transformers model again; FLOPs per token are what torch counts; pretrained weights of a family
lmdist's own GPT does not compute come in; bad configs are refused by name. (It learns: test_learning.)"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmdist import engine, export, inference, optim
from lmdist.config import make_config
from lmdist.models import build_model
from tests.conftest import (
    REPO,
    TRAIN,
    equivalence_args,
    final_weights,
    launch,
    launch_command,
    launch_env,
    read_metrics,
    read_run,
    run_ok,
    tiny_hf_config,
    wait_for_step,
    with_flags,
    without_flags,
)
from tests.test_distributed import assert_same_training
from tests.test_perf import counted_flops_per_token
from tests.test_transformers import TRANSFORMERS_SIDE, in_transformers

pytestmark = pytest.mark.launch


def base_args(markov_files) -> list[str]:
    """The equivalence runs' training without lmdist's model flags, which --model hf refuses."""
    return without_flags(equivalence_args(markov_files), "--model", "--n_layer", "--n_head", "--n_embd", "--dropout")


def hf_args(markov_files, config) -> list[str]:
    return [*base_args(markov_files), "--model", "hf", "--hf_config", str(config)]


def lmdist_export(checkpoint, out) -> None:
    command = [sys.executable, "-m", "lmdist", "export", "--checkpoint", str(checkpoint), "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=launch_env())
    assert done.returncode == 0, done.stderr[-3000:]


def fsdp_command(args: list[str]) -> list[str]:
    """accelerate_configs/fsdp.yaml on 2 CPU ranks, in fp32 (its bf16 is for GPUs)."""
    command = launch_command(args, 2, "accelerate-config", "fsdp.yaml")
    at = command.index(str(TRAIN))
    return [*command[:at], "--mixed_precision", "no", *command[at:]]


@pytest.fixture(scope="module")
def hf_runs(markov_files, tmp_path_factory):
    """The equivalence training (global batch 8, 16 steps over two epochs) of a tiny Llama: 1 process x 8,
    2 torchrun ranks x 4, 1 process x 4 x grad_accum 2, and fsdp.yaml's FSDP2 on 2 CPU ranks x 4."""
    root = tmp_path_factory.mktemp("hf_model")
    args = hf_args(markov_files, tiny_hf_config(root))
    out = {name: root / name for name in ("one_b8", "torchrun_b4", "accum_b4x2", "fsdp_b4")}
    done = run_ok([*args, "--batch_size", "8", "--output_dir", str(out["one_b8"])], cwd=root)
    (out["one_b8"] / "stdout.log").write_text(done.stdout + done.stderr)
    run_ok([*args, "--batch_size", "4", "--output_dir", str(out["torchrun_b4"])], cwd=root, nproc=2,
           launcher="torchrun")
    run_ok([*args, "--batch_size", "4", "--grad_accum", "2", "--output_dir", str(out["accum_b4x2"])], cwd=root)
    fsdp = subprocess.run(fsdp_command([*args, "--batch_size", "4", "--output_dir", str(out["fsdp_b4"])]), cwd=root,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert fsdp.returncode == 0, fsdp.stderr[-5000:]
    return out


@pytest.mark.parametrize("name", ["torchrun_b4", "accum_b4x2", "fsdp_b4"])
def test_an_hf_model_trains_the_same_on_two_ranks_accumulated_and_sharded(hf_runs, name):
    assert_same_training(hf_runs[name], hf_runs["one_b8"])
    facts = read_run(hf_runs[name])
    if name == "fsdp_b4":  # really sharded, by its own decoder layers
        assert (facts["distributed_type"], facts["world_size"]) == ("FSDP", 2)
        held = facts["parameters_per_rank"]
        assert all(abs(h - facts["parameters"] / 2) <= 0.05 * facts["parameters"] for h in held)


@pytest.mark.parametrize("how", ["compile", "bf16"])
def test_an_hf_model_compiled_or_in_bf16_trains_the_eager_fp32_model(hf_runs, markov_files, tmp_path, how):
    """Compiled: the same training up to kernel rounding (and not bitwise: really compiled). bf16 autocast:
    recorded, and the losses of fp32 to bf16's precision."""
    out = tmp_path / how
    args = [*hf_args(markov_files, tiny_hf_config(tmp_path)), "--batch_size", "8", "--output_dir", str(out)]
    run_ok([*args, "--compile"] if how == "compile" else args, cwd=tmp_path,
           env={"ACCELERATE_MIXED_PRECISION": "bf16"} if how == "bf16" else None)
    got = {r["step"]: r["train/loss"] for r in read_metrics(out) if "train/loss" in r}
    want = {r["step"]: r["train/loss"] for r in read_metrics(hf_runs["one_b8"]) if "train/loss" in r}
    assert sorted(got) == sorted(want) == list(range(1, 17)) and got != want
    assert all(abs(got[s] - want[s]) <= (1e-3 if how == "compile" else 2e-2) * want[s] for s in got)
    assert read_run(out)["mixed_precision"] == ("bf16" if how == "bf16" else "no")


def test_an_hf_models_plan_names_its_class_and_its_parameters(hf_runs):
    log = (hf_runs["one_b8"] / "stdout.log").read_text()
    assert "model: hf LlamaForCausalLM from " in log and ": 2 layers x 4 heads x 32, untied head" in log
    weights = final_weights(hf_runs["one_b8"])
    assert read_run(hf_runs["one_b8"])["parameters"] == sum(t.numel() for t in weights.values())
    assert all(name.startswith("hf.model.") or name == "hf.lm_head.weight" for name in weights)


def test_an_hf_runs_export_is_the_transformers_model_and_lmdist_reads_it_back(hf_runs, markov_files, tmp_path):
    final = hf_runs["one_b8"] / "final"
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    saved = inference.open_saved(str(final))
    model = inference.load_model(saved)
    val_text = markov_files["short_val"].read_text()
    case = {"folder": str(final), "val_text": val_text, "block_size": 32, "prompt": val_text[:2]}
    theirs = in_transformers(TRANSFORMERS_SIDE, json.dumps({"run": case}))["run"]
    assert theirs["class"] == "LlamaForCausalLM" and theirs["missing"] == theirs["unexpected"] == []
    with torch.no_grad():
        ours = model(torch.tensor([theirs["ids"]]))[0]
    assert (ours - torch.tensor(theirs["logits"])).abs().max().item() <= 1e-5
    assert theirs["loss"] == pytest.approx(read_metrics(hf_runs["one_b8"])[-1]["val/loss"], rel=1e-5)
    greedy = inference.generate(str(final), val_text[:2], 50, 0.0, 0, 0)
    assert greedy[:30] == theirs["text"][:30]  # beyond block_size lmdist's context is a sliding window
    again = tmp_path / "again"  # lmdist export of a checkpoint writes the same model
    step = sorted((hf_runs["one_b8"] / "checkpoints").iterdir())[-1]
    lmdist_export(step, again)
    a, b = export.read_weights(str(again)), export.read_weights(str(final))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stopped_hf_run_relaunched_is_bitwise_the_unstopped_run(markov_files, tmp_path):
    """And a relaunch after its config.json was edited (a value that changes no shape) is refused by name."""
    config = tiny_hf_config(tmp_path)
    args = with_flags(hf_args(markov_files, config), "--dataset", str(markov_files["train"]),
                      "--batch_size", "4", "--max_steps", "300", "--eval_every", "100", "--save_every", "1000",
                      "--threads", "1")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_ok([*args, "--output_dir", str(whole)], cwd=tmp_path)
    process = subprocess.Popen(launch_command([*args, "--output_dir", str(stopped)]), cwd=tmp_path, env=launch_env(),
                               text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_step(stopped, 3, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    assert not (stopped / "final").exists(), "the stop came after the run's end: make it longer"
    written = config.read_text()
    config.write_text(json.dumps({**json.loads(written), "rms_norm_eps": 1e-5}))
    refused = launch([*args, "--output_dir", str(stopped)], cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"hf_config {config} differs from the transformers config the checkpoint" in refused.stderr
    assert "rms_norm_eps (checkpoint 1e-06, now 1e-05)" in refused.stderr
    kept = tmp_path / "kept"  # its checkpoints keep the config they trained, edited file or not
    step = next((stopped / "checkpoints").iterdir())
    lmdist_export(step, kept)
    assert json.loads((kept / "config.json").read_text())["rms_norm_eps"] == 1e-6
    config.write_text(written)
    relative = with_flags(args, "--hf_config", config.name)  # the same file, spelt otherwise: its contents count
    run_ok([*relative, "--output_dir", str(stopped)], cwd=tmp_path)
    assert [r["resumed_from"] for r in read_metrics(stopped) if "resumed_from" in r]
    ours, theirs = final_weights(stopped), final_weights(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("changes", [{}, {"tie_word_embeddings": True}, "gpt2"], ids=["llama", "llama-tied", "gpt2"])
def test_an_hf_models_flops_per_token_is_the_palm_formula_and_what_torch_counts(tmp_path, changes):
    # GPT-2 64 wide: the convention counts its many biases and norm weights as matmul weights, 2% at width 32
    config = tiny_hf_config(tmp_path, "gpt2", n_embd=64) if changes == "gpt2" else tiny_hf_config(tmp_path, **changes)
    width = 64 if changes == "gpt2" else 32  # the query heads'
    model = build_model(make_config({"model": "hf", "hf_config": str(config), "block_size": 64}), 300)
    hf = model.hf
    lookups = [hf.get_input_embeddings().weight] if hf.get_input_embeddings().weight is not \
        hf.get_output_embeddings().weight else []
    lookups += [hf.transformer.wpe.weight] if changes == "gpt2" else []
    n = sum(p.numel() for p in model.parameters()) - sum(w.numel() for w in lookups)
    assert model.flops_per_token() == 6 * n + 12 * 2 * width * 64
    idx = torch.randint(0, 300, (2, 64))
    with sdpa_kernel(SDPBackend.MATH):
        counted = counted_flops_per_token(lambda i: F.cross_entropy(model(i).flatten(0, 1), i.flatten()), idx)
    assert counted == pytest.approx(model.flops_per_token(), rel=0.02)


def test_muon_takes_the_decoder_layers_matrices_of_an_hf_model(tmp_path):
    cfg = make_config({"model": "hf", "hf_config": str(tiny_hf_config(tmp_path)), "optimizer": "muon"})
    model = build_model(cfg, 300)
    layers = [name for name, p in model.named_parameters() if ".layers." in name and p.dim() == 2]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 decoder layers
    assert {id(p) for p in model.hidden_matrices()} == {id(p) for n, p in model.named_parameters() if n in layers}
    optimizer = optim.build_optimizer(cfg, model)
    muon, _ = optimizer.optimizers
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for p in model.hidden_matrices()}


def test_fsdp_yaml_on_gpus_wraps_an_hf_models_decoder_layers(monkeypatch, tmp_path):
    """The GPU path: Accelerate's FSDP plugin gets the model's own `_no_split_modules` class (fsdp.yaml names
    only lmdist's), and its wrap policy finds it in the model."""
    for name, value in {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "2", "FSDP_VERSION": "2",
                        "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                        "FSDP_TRANSFORMER_CLS_TO_WRAP": "Block,LSTM"}.items():
        monkeypatch.setenv(name, value)
    cfg = make_config({"model": "hf", "hf_config": str(tiny_hf_config(tmp_path))})
    plugin = engine.fsdp_plugin(cfg)
    assert plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    plugin.set_auto_wrap_policy(build_model(cfg, 100))
    assert [cls.__name__ for cls in plugin.auto_wrap_policy.keywords["transformer_layer_cls"]] == ["LlamaDecoderLayer"]


def test_pretrained_weights_of_a_family_lmdists_gpt_lacks_fine_tune_as_the_hf_model(markov_files, tmp_path):
    """A Mistral folder (lmdist's GPT refuses its model_type): --model hf takes its weights and tokenizer, and
    the first validation loss at lr 0 is transformers' own loss on the same text."""
    folder = tmp_path / "mistral"
    val = tmp_path / "val.txt"
    val.write_text("".join(f"a dog sat on the mat {i}\n" for i in range(30)))
    theirs = in_transformers(MISTRAL_SIDE, str(folder), val.read_text())
    refused = subprocess.run([sys.executable, str(TRAIN), "--init_from", str(folder), "--output_dir",
                              str(tmp_path / "gpt")], capture_output=True, text=True, timeout=120, env=launch_env())
    assert refused.returncode == 2 and "--model hf trains it as the transformers model itself" in refused.stderr
    out = tmp_path / "tuned"
    done = run_ok(["--model", "hf", "--init_from", str(folder), "--dataset", str(val), "--val_dataset", str(val),
                   "--block_size", "64", "--batch_size", "2", "--lr", "0", "--max_steps", "1", "--eval_every", "1",
                   "--output_dir", str(out)], cwd=tmp_path)
    assert "is a transformers MistralForCausalLM: trained as itself (--model hf), and its tokenizer" in done.stdout
    first = read_metrics(out)[0]
    assert first["val/loss"] == pytest.approx(theirs["loss"], abs=1e-5)
    final = json.loads((out / "final" / "config.json").read_text())
    assert final["model_type"] == "mistral" and final["bos_token_id"] == theirs["bos"] != final["eos_token_id"]
    again = tmp_path / "again"  # a checkpoint's export keeps the pretrained tokenizer's ids too
    step = next((out / "checkpoints").iterdir())
    lmdist_export(step, again)
    assert json.loads((again / "config.json").read_text()) == final


# A tiny random Mistral with a BPE tokenizer, saved as transformers saves a model; its loss on the text as
# lmdist's evaluation packs it (block 64, every target once).
MISTRAL_SIDE = r"""
import json, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast
folder, text = sys.argv[1], sys.argv[2]
bpe = Tokenizer(models.BPE())
bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
bpe.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
torch.manual_seed(0)
model = MistralForCausalLM(MistralConfig(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         sliding_window=None, eos_token_id=tokenizer.eos_token_id)).eval()
model.save_pretrained(folder)
tokenizer.save_pretrained(folder)
ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
total, count = 0.0, 0
with torch.no_grad():
    for start in range(0, len(ids) - 1, 64):
        chunk = torch.tensor([ids[start:start + 65]])
        total += torch.nn.functional.cross_entropy(model(chunk[:, :-1]).logits[0], chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
print(json.dumps({"loss": total / count, "bos": model.config.bos_token_id}))
"""


@pytest.mark.parametrize("flags, message", [
    (["--model", "hf"], "--model hf needs a transformers config: --hf_config CONFIG.json"),
    (["--model", "gpt", "--hf_config", "CONFIG"], "only --model hf builds a transformers config"),
    (["--model", "hf", "--hf_config", "CONFIG", "--tie_weights", "true"], "its config's tie_word_embeddings"),
    (["--model", "hf", "--hf_config", "CONFIG", "--block_size", "256"], "longer than hf_config"),
    (["--model", "hf", "--hf_config", "VIT"], "model_type 'vit' has no causal language model"),
    (["--model", "hf", "--hf_config", "BERT"], "transformers cannot build this model (The hidden size (32) is not"),
    (["--model", "hf", "--hf_config", "ENCODER"], "BertLMHeadModel lets each position see later tokens"),
    (["--model", "hf", "--hf_config", "CONFIG", "--n_layer", "8"], "--model hf builds its transformers config as it"),
    (["--model", "hf", "--hf_config", "MISSING"], "no such config.json"),
])
def test_bad_hf_configs_are_refused_by_name(markov_files, tmp_path, flags, message):
    config, paths = tiny_hf_config(tmp_path), {"MISSING": str(tmp_path / "nowhere")}
    for kind in ("vit", "bert"):  # not a causal LM; heads that do not divide the width
        paths[kind.upper()] = str(tmp_path / f"{kind}.json")
        (tmp_path / f"{kind}.json").write_text(json.dumps({"model_type": kind, "hidden_size": 32}))
    paths["CONFIG"], paths["ENCODER"] = str(config), str(tmp_path / "encoder.json")
    (tmp_path / "encoder.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1,
                                                       "num_attention_heads": 4, "intermediate_size": 64}))
    args = [*base_args(markov_files), *[paths.get(f, f) for f in flags]]
    done = launch([*args, "--output_dir", str(tmp_path / "o")], cwd=REPO, timeout=120)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
