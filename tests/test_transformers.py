"""Exports as transformers folders: each mapping computes lmdist's logits, validation loss and greedy text in
transformers, in a process where lmdist cannot be imported; AutoTokenizer gives each tokenizer's ids; lmdist
reads its exports back (and the exports of before); a model without an equivalent says so and still exports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmdist import export, inference, transformers_format
from lmdist.config import make_config
from lmdist.models import build_model, vocab_rows
from lmdist.tokenizer import ByteTokenizer, HFTokenizer, VocabTokenizer, save_for_transformers
from tests.conftest import TINY_GPT, TRAIN, launch_env, run_ok

GPT = {"model": "gpt", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, "dropout": 0.0}
MAPPINGS = {  # lmdist architecture -> the transformers class its export must be
    "gpt2": ({"gpt_style": "gpt2"}, "GPT2LMHeadModel"),
    "gpt2 bare, padded": ({"gpt_style": "gpt2", "bias": False, "norm_scale": False, "tie_weights": False,
                           "vocab_multiple": 16}, "GPT2LMHeadModel"),
    "llama, biases, padded": ({"gpt_style": "modern", "qk_norm": False, "bias": True, "rope_theta": 500.0,
                               "vocab_multiple": 16}, "LlamaForCausalLM"),
    "qwen3": ({"gpt_style": "modern"}, "Qwen3ForCausalLM"),
    "qwen3 tied, no scales": ({"gpt_style": "modern", "tie_weights": True, "norm_scale": False}, "Qwen3ForCausalLM"),
    "gpt2 tanh, qkv bias, widths": ({"gpt_style": "gpt2", "mlp": "gelu_tanh", "qkv_bias": True, "mlp_width": 48,
                                     "norm_eps": 1e-3}, "GPT2LMHeadModel"),
    "llama grouped, qkv bias": ({"gpt_style": "modern", "qk_norm": False, "n_head": 4, "n_kv_head": 2,
                                 "head_dim": 12, "mlp_width": 40, "norm_eps": 1e-5, "qkv_bias": True},
                                "LlamaForCausalLM"),
    "qwen3 grouped": ({"gpt_style": "modern", "n_head": 4, "n_kv_head": 1, "head_dim": 16}, "Qwen3ForCausalLM"),
}
PROMPT = "the cat "
# Text a tokenizer must encode as lmdist does: Python's whitespace (wider than a Rust regex's \s), line ends,
# accents, CJK, an emoji, symbols the char/word vocabularies never saw, and the special tokens' text.
HARD_TEXTS = ["the cat sat\n", "  two  spaces\tand\ttabs \r\n", "nbsp\u00a0thin\u2009sep\x1cline\u2028end",
              "café naïve 日本語 😀", "zzz unseen qqq <unk> <eos>", "", "\n\n", "trailing "]


def training_text() -> str:
    return "".join(f"the cat sat on mat {i % 7}. a dog ran to the cat\n" for i in range(60)) + "café naïve\n"


def perturbed_model(cfg, vocab_size: int, seed: int, prompt: list[int] | None = None) -> torch.nn.Module:
    """A model whose every weight is non-trivial (zero-initialised projections would hide a wrong mapping); with
    a padded vocabulary and a `prompt`, padding rows that would be the greedy choice after it."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        if prompt and cfg.vocab_multiple > 1 and model.lm_head.weight is not model.wte.weight:
            best = model(torch.tensor([prompt]))[0, -1, :vocab_size].argmax()  # its logit is positive: doubled wins
            model.lm_head.weight[vocab_size:] = 2 * model.lm_head.weight[best]
    return model


# Runs with `lmdist` unimportable: the folder must stand on its own.
TRANSFORMERS_SIDE = r"""
import json, sys
sys.modules["lmdist"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
cases, out = json.loads(sys.argv[1]), {}
for name, case in cases.items():
    model, info = AutoModelForCausalLM.from_pretrained(case["folder"], output_loading_info=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(case["folder"])
    ids = tokenizer(case["val_text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    T, total, count = case["block_size"], 0.0, 0
    with torch.no_grad():
        logits = model(torch.tensor([ids[:T]])).logits[0].tolist()
        for start in range(0, len(ids) - 1, T):  # lmdist's evaluation packing: every target once
            chunk = torch.tensor([ids[start:start + T + 1]])
            out_logits = model(chunk[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(out_logits[0], chunk[0, 1:], reduction="sum").item()
            count += chunk.shape[1] - 1
        prompt = tokenizer(case["prompt"], add_special_tokens=False, return_tensors="pt")["input_ids"]
        # the export's generation config (padding rows suppressed), going on past the end-of-text token as lmdist's
        generated = model.generate(prompt, max_new_tokens=50, do_sample=False,
                                   eos_token_id=None)[0, prompt.shape[1]:].tolist()
    out[name] = {"class": type(model).__name__, "missing": sorted(info["missing_keys"]),
                 "unexpected": sorted(info["unexpected_keys"]), "mismatched": [str(k) for k in info["mismatched_keys"]],
                 "ids": ids[:T], "logits": logits, "loss": total / count,
                 "generated": generated, "text": tokenizer.decode(generated), "eos": tokenizer.eos_token_id}
print(json.dumps(out))
"""


def in_transformers(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
                          env=launch_env())
    assert done.returncode == 0, done.stderr[-5000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """Each mapping's export (random, non-trivial weights; char tokenizer), lmdist's figures on it, and
    transformers' figures on the same folder."""
    root = tmp_path_factory.mktemp("transformers")
    tokenizer = VocabTokenizer.train("char", [training_text()], 1)
    val = root / "val.txt"
    val.write_text("".join(f"a dog sat on the mat {i}\n" for i in range(20)))
    cases, lmdist_side = {}, {}
    for seed, (name, (fields, _)) in enumerate(MAPPINGS.items()):
        cfg = make_config({**GPT, **fields})
        model = perturbed_model(cfg, tokenizer.vocab_size, seed, tokenizer.encode(PROMPT))
        folder = root / name.replace(" ", "_").replace(",", "")
        line = export.write_export(str(folder), model.state_dict(), cfg, tokenizer)
        evaluated = subprocess.run([sys.executable, "-m", "lmdist", "eval", "--checkpoint", str(folder), "--dataset",
                                    str(val), "--split", "train", "--output", str(folder / "eval.json")],
                                   capture_output=True, text=True, timeout=300, env=launch_env())
        assert evaluated.returncode == 0, evaluated.stderr[-3000:]
        ids = tokenizer.encode(val.read_text()) + [tokenizer.eos_id]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:cfg.block_size]]))[0]
            after_prompt = model(torch.tensor([tokenizer.encode(PROMPT)]))[0, -1]
        if cfg.vocab_multiple > 1:  # what generation must never pick is the raw argmax: the test can fail
            assert after_prompt.argmax() >= tokenizer.vocab_size
        lmdist_side[name] = {"line": line, "logits": logits, "ids": ids[:cfg.block_size],
                             "val_loss": json.loads((folder / "eval.json").read_text())["val/loss"],
                             "text": inference.generate(str(folder), PROMPT, 50, 0.0, 0, 0),
                             "vocab_size": tokenizer.vocab_size, "cfg": cfg, "model": model}
        cases[name] = {"folder": str(folder), "val_text": val.read_text(), "block_size": cfg.block_size,
                       "prompt": PROMPT}
    return lmdist_side, in_transformers(TRANSFORMERS_SIDE, json.dumps(cases)), cases


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_each_mapping_loads_strictly_as_its_transformers_class(exports, name):
    lmdist_side, hf, _ = exports
    assert hf[name]["class"] == MAPPINGS[name][1]
    assert MAPPINGS[name][1] in lmdist_side[name]["line"]
    assert hf[name]["missing"] == hf[name]["unexpected"] == hf[name]["mismatched"] == []


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_transformers_computes_lmdists_logits_loss_and_greedy_text(exports, name):
    lmdist_side, hf, _ = exports
    ours, theirs = lmdist_side[name], hf[name]
    assert theirs["ids"] == ours["ids"]
    assert (torch.tensor(theirs["logits"]) - ours["logits"]).abs().max().item() <= 1e-5
    assert theirs["loss"] == pytest.approx(ours["val_loss"], abs=1e-5)
    assert len(theirs["generated"]) == 50
    assert max(theirs["generated"]) < ours["vocab_size"]  # never a padding row, though they would win
    assert theirs["text"] == ours["text"]


def test_padding_rows_are_in_the_config_and_suppressed_in_generation(exports):
    lmdist_side, _, cases = exports
    for name in ("gpt2 bare, padded", "llama, biases, padded"):
        folder = Path(cases[name]["folder"])
        config = json.loads((folder / "config.json").read_text())
        weights = load_file(folder / "model.safetensors")
        vocab = lmdist_side[name]["vocab_size"]
        rows = vocab_rows(lmdist_side[name]["cfg"], vocab)
        assert config["vocab_size"] == rows == weights["lm_head.weight"].shape[0] > vocab
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["suppress_tokens"] == list(range(vocab, rows))


@pytest.mark.parametrize("name", list(MAPPINGS))
def test_lmdist_reads_its_export_back_bit_for_bit(exports, name):
    lmdist_side, _, cases = exports
    ours = lmdist_side[name]
    back = export.read_weights(cases[name]["folder"])
    for key, tensor in ours["model"].state_dict().items():
        if key in back:
            assert torch.equal(back[key], tensor), key
    assert set(ours["model"].state_dict()) - set(back) <= {"lm_head.weight"}  # a tied head is the embedding


def test_weights_an_lmdist_model_cannot_hold_are_refused_on_reading(exports, tmp_path):
    """GPT-2's c_attn bias is zeros in an lmdist export; real values there have no place in lmdist's model."""
    _, _, cases = exports
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "gpt2"
    shutil.copytree(cases["gpt2"]["folder"], folder)
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.0.attn.c_attn.bias"] += 0.5
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(Exception, match=r"c_attn\.bias is not all 0s"):
        export.read_weights(str(folder))


@pytest.mark.parametrize("fields, reason", [
    ({"gpt_style": "modern", "mlp": "relu2"}, "rope with mlp relu2"),
    ({"gpt_style": "gpt2", "norm": "rmsnorm"}, "learned positions with norm rmsnorm"),
    ({"gpt_style": "modern", "bias": True}, "rope with qk_norm and bias"),
    ({"gpt_style": "gpt2", "n_head": 4, "n_kv_head": 2}, "learned positions with n_kv_head 2"),
    ({"model": "lstm", "embedding_dim": 16, "hidden_dim": 16}, "the LSTM has no transformers equivalent"),
])
def test_a_model_without_an_equivalent_is_exported_in_lmdists_format_and_says_why(fields, reason, tmp_path):
    tokenizer = VocabTokenizer.train("char", [training_text()], 1)
    cfg = make_config({**GPT, **fields})
    model = perturbed_model(cfg, tokenizer.vocab_size, 0)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # an earlier export's transformers config: it must not stay
    line = export.write_export(str(folder), model.state_dict(), cfg, tokenizer)
    assert line.startswith("lmdist's format only, no transformers model: ") and reason in line
    assert not (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()
    back = export.read_weights(str(folder))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items() if k in back)
    assert inference.generate(str(folder), "the", 10, 0.0, 0, 0)  # lmdist still uses it


def test_an_export_written_before_transformers_folders_still_loads(tmp_path):
    """c5ac202's final/: lmdist's config.json (no model_type), lmdist's names, the tokenizer in tokenizer/."""
    from safetensors.torch import save_file

    tokenizer = VocabTokenizer.train("char", [training_text()], 1)
    cfg = make_config({**GPT, "gpt_style": "gpt2"})
    model = perturbed_model(cfg, tokenizer.vocab_size, 3)
    folder = tmp_path / "final"
    folder.mkdir()
    save_file({k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "model": "gpt", "vocab_size": tokenizer.vocab_size, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0,
        "block_size": 64, "vocab_multiple": 1, "tie_weights": True}))
    tokenizer.save(str(folder / "tokenizer"))
    saved = inference.open_saved(str(folder))
    assert saved.cfg.architecture["position"] == "learned"  # read as gpt2, the only GPT there was
    loaded = inference.load_model(saved).state_dict()
    assert all(torch.equal(a, b) for a, b in zip(loaded.values(), model.state_dict().values(), strict=True))


TOKENIZER_SIDE = r"""
import json, sys
sys.modules["lmdist"] = None
from transformers import AutoTokenizer
folders, texts = json.loads(sys.argv[1]), json.loads(sys.argv[2])
out = {}
for name, folder in folders.items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    out[name] = {"ids": ids, "eos": tokenizer.eos_token_id, "eos_token": tokenizer.eos_token,
                 "decoded": [tokenizer.decode(i) for i in ids],
                 "decoded_skipping": [tokenizer.decode(i, skip_special_tokens=True) for i in ids]}
print(json.dumps(out))
"""


def test_autotokenizer_gives_lmdists_ids_for_every_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    text = training_text()
    user = Tokenizer(models.BPE(unk_token="[UNK]"))  # a folder tokenizer of the user's, with its own end token
    user.pre_tokenizer = pre_tokenizers.Whitespace()
    user.train_from_iterator([text], trainers.BpeTrainer(vocab_size=80, special_tokens=["[UNK]", "</s>"]))
    (tmp_path / "user").mkdir()
    user.save(str(tmp_path / "user" / "tokenizer.json"))
    (tmp_path / "user" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tokenizers = {"byte": ByteTokenizer(), "char": VocabTokenizer.train("char", [text], 1),
                  "word": VocabTokenizer.train("word", [text], 1), "bpe": HFTokenizer.train_bpe(iter([text]), 300),
                  "folder": HFTokenizer.from_folder(str(tmp_path / "user"))}
    folders = {}
    for name, tokenizer in tokenizers.items():
        folders[name] = str(tmp_path / name)
        save_for_transformers(tokenizer, folders[name], 64)
    hf = in_transformers(TOKENIZER_SIDE, json.dumps(folders), json.dumps(HARD_TEXTS))
    for name, tokenizer in tokenizers.items():
        assert hf[name]["ids"] == [tokenizer.encode(t) for t in HARD_TEXTS], name
        assert hf[name]["eos"] == tokenizer.eos_id is not None, name
        # lmdist's byte and char decoders show <unk>; a `tokenizers` one (bpe, folder) skips special tokens
        decoded = hf[name]["decoded_skipping" if isinstance(tokenizer, HFTokenizer) else "decoded"]
        if name != "word":  # transformers' word-level decode puts a space beside line breaks too
            assert decoded == [tokenizer.decode(tokenizer.encode(t)) for t in HARD_TEXTS], name
    assert hf["folder"]["eos_token"] == "</s>"


def test_a_run_exports_final_as_a_transformers_folder_and_lmdist_export_writes_the_same(markov_files, tmp_path):
    out = tmp_path / "run"
    done = run_ok([*TINY_GPT, "--dataset", str(markov_files["short"]), "--max_steps", "2", "--eval_every", "2",
                   "--output_dir", str(out)], cwd=tmp_path)
    assert f"final weights: {out / 'final'}: a transformers Qwen3ForCausalLM folder" in done.stdout + done.stderr
    names = {p.name for p in (out / "final").iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "lmdist_tokenizer.json", "lmdist.json"}
    step, = (out / "checkpoints").iterdir()
    exported = subprocess.run([sys.executable, "-m", "lmdist", "export", "--checkpoint", str(step), "--out",
                               str(tmp_path / "again")], capture_output=True, text=True, timeout=120, env=launch_env())
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "Qwen3ForCausalLM" in exported.stdout
    final, again = load_file(out / "final" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "final" / name).read_text() == (tmp_path / "again" / name).read_text(), name
    refused = subprocess.run([sys.executable, "-m", "lmdist", "export", "--checkpoint", str(step), "--out",
                              str(tmp_path / "run")], capture_output=True, text=True, timeout=120, env=launch_env())
    assert refused.returncode == 2 and "is not an lmdist export: choose a new or empty folder" in refused.stderr


def test_family_follows_the_architecture_not_the_style():
    assert transformers_format.family(make_config({**GPT, "gpt_style": "modern", "qk_norm": False})) == "llama"
    assert transformers_format.family(make_config({**GPT, "gpt_style": "gpt2", "zero_init": True})) == "gpt2"


# ----------------------------------------------------------------------------- in: init_from a transformers folder

PRETRAINED_SIDE = r"""
import json, sys
sys.modules["lmdist"] = None
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen3Config)
root, text, val_text = sys.argv[1], sys.argv[2], sys.argv[3]
tok = Tokenizer(models.BPE())
tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
shape = dict(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
configs = {  # vocabularies padded past the tokenizer's; biases, groups and head widths of each family
    "gpt2": GPT2Config(vocab_size=320, n_positions=128, n_embd=32, n_layer=2, n_head=2),
    "llama": LlamaConfig(**shape, num_key_value_heads=2, rms_norm_eps=1e-5, mlp_bias=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 500.0}),
    "qwen2": Qwen2Config(**shape, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen3": Qwen3Config(**shape, num_key_value_heads=2, head_dim=16),
}
out = {}
for name, config in configs.items():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)  # biases and norm scales too, which start at 0 and 1
    model.save_pretrained(f"{root}/{name}", max_shard_size="50KB" if name == "qwen3" else "5GB")  # qwen3: shards
    tokenizer.save_pretrained(f"{root}/{name}")
    ids = tokenizer(val_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    total, count = 0.0, 0
    with torch.no_grad():
        logits = model(torch.tensor([ids[:64]])).logits[0].tolist()
        for start in range(0, len(ids) - 1, 64):  # lmdist's evaluation packing
            chunk = torch.tensor([ids[start:start + 65]])
            total += torch.nn.functional.cross_entropy(model(chunk[:, :-1]).logits[0], chunk[0, 1:],
                                                       reduction="sum").item()
            count += chunk.shape[1] - 1
    out[name] = {"ids": ids[:64], "logits": logits, "loss": total / count, "class": type(model).__name__}
print(json.dumps(out))
"""
PRETRAINED = ("gpt2", "llama", "qwen2", "qwen3")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """Tiny random transformers models of each family lmdist imports, saved with a BPE tokenizer, and
    transformers' logits and validation loss on them."""
    root = tmp_path_factory.mktemp("pretrained")
    val = root / "val.txt"
    val.write_text("".join(f"a dog sat on the mat {i}\n" for i in range(30)))
    hf = in_transformers(PRETRAINED_SIDE, str(root), training_text(), val.read_text())
    return root, val, hf


@pytest.mark.parametrize("name", PRETRAINED)
def test_lmdist_computes_a_pretrained_models_logits_with_its_tokenizer(pretrained, name):
    from lmdist import export
    from lmdist.tokenizer import HFTokenizer

    root, val, hf = pretrained
    folder = str(root / name)
    cfg, line = export.adopt_pretrained(make_config({"init_from": folder, "block_size": 64, "dropout": 0.0}))
    assert line.startswith(f"init_from: {folder} is a transformers {hf[name]['class']}: trained as lmdist's gpt with")
    assert cfg.tokenizer == folder and cfg.model == "gpt"
    tokenizer = HFTokenizer.from_folder(folder)
    assert (tokenizer.encode(val.read_text()) + [tokenizer.eos_id])[:64] == hf[name]["ids"]  # its ids, as lmdist reads
    model = build_model(cfg, tokenizer.vocab_size).eval()
    assert "init_from: loaded" in export.init_weights(model, folder, cfg)
    assert (root / name / "model.safetensors.index.json").exists() == (name == "qwen3")  # one read from its shards
    with torch.no_grad():
        logits = model(torch.tensor([hf[name]["ids"]]))[0]
    theirs = torch.tensor(hf[name]["logits"])
    assert logits.shape == theirs.shape == (64, 320)  # all its rows, those past the tokenizer's too
    assert cfg.vocab_multiple == 320 > tokenizer.vocab_size
    assert (logits - theirs).abs().max().item() <= 1e-5


def test_fine_tuning_starts_from_the_pretrained_models_loss(pretrained, tmp_path):
    """lr 0, one step: the run's validation loss is transformers' loss on the same text, not a random init's."""
    root, val, hf = pretrained
    out = tmp_path / "tuned"
    done = run_ok(["--init_from", str(root / "llama"), "--dataset", str(val), "--val_dataset", str(val),
                   "--block_size", "64", "--batch_size", "2", "--dropout", "0", "--lr", "0", "--max_steps", "1",
                   "--eval_every", "1", "--output_dir", str(out)], cwd=tmp_path)
    assert "is a transformers LlamaForCausalLM: trained as lmdist's gpt with" in done.stdout + done.stderr
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["val/loss"] == pytest.approx(hf["llama"]["loss"], abs=1e-5)
    exported = json.loads((out / "final" / "config.json").read_text())
    assert exported["model_type"] == "llama" and exported["num_key_value_heads"] == 2  # it goes back out as it came


def test_a_stopped_fine_tuning_run_continues_exactly_when_its_command_is_relaunched(pretrained, tmp_path):
    """SIGTERM, then the same command (init_from included), as a requeued job does: bitwise the unstopped run.
    init_from another folder is refused by name, and nothing of the stopped run is lost."""
    import shutil
    import signal

    from tests.conftest import final_weights, launch_command, read_metrics, wait_for_step

    root, val, _ = pretrained
    def args(out: Path, init_from: Path = root / "llama") -> list[str]:
        return ["--init_from", str(init_from), "--dataset", str(val), "--val_dataset", str(val), "--block_size", "32",
                "--batch_size", "2", "--max_steps", "300", "--eval_every", "100", "--save_every", "1000",
                "--log_every", "1", "--threads", "1", "--output_dir", str(out)]

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    run_ok(args(whole), cwd=tmp_path)
    process = subprocess.Popen(launch_command(args(stopped)), cwd=tmp_path, env=launch_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    wait_for_step(stopped, 3, process)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=120)
    saved = sorted((stopped / "checkpoints").iterdir())
    assert len(saved) == 1 and not (stopped / "final").exists(), "the stop came after the run's end: make it longer"

    twin = tmp_path / "twin"  # the same weights in another folder: another start, all the same
    shutil.copytree(root / "llama", twin)
    refused = subprocess.run(launch_command(args(stopped, twin)), cwd=tmp_path, env=launch_env(), text=True,
                             capture_output=True, timeout=120)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"began from init_from {root / 'llama'}, not from init_from {twin}: relaunch with --init_from" \
        in refused.stderr
    assert sorted((stopped / "checkpoints").iterdir()) == saved

    run_ok(args(stopped), cwd=tmp_path)
    rows = read_metrics(stopped)
    resumed = [row["resumed_from"] for row in rows if "resumed_from" in row]
    assert rows[-1]["step"] == 300 and resumed == [int(saved[0].name.removeprefix("step_"))]
    ours, theirs = final_weights(stopped), final_weights(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type llama3"),
    ({"model_type": "mistral"}, "model_type 'mistral'"),
])
def test_a_pretrained_model_lmdist_cannot_compute_exactly_is_refused_by_name(pretrained, tmp_path, change, message):
    import shutil

    root, _, _ = pretrained
    folder = tmp_path / "model"
    shutil.copytree(root / "llama", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    done = subprocess.run([sys.executable, str(TRAIN), "--init_from", str(folder), "--output_dir", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=120, env=launch_env())
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
