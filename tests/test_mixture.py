"""Weighted mixtures (lmdist.mixture): the spec, the proportions per batch, exact resume, per-source validation."""
from __future__ import annotations

import numpy as np
import pytest

from lmdist.data import MixedSequences
from lmdist.errors import ConfigError
from lmdist.mixture import MixtureOrder, Source, check_batch, parse_mixture
from tests import faults
from tests.conftest import TINY_GPT, launch, read_metrics, run_ok


class Sized:
    """A stand-in for PackedSequences: only its length and block size matter to the order."""

    def __init__(self, n: int):
        self.n, self.block_size = n, 4

    def __len__(self) -> int:
        return self.n


SOURCES = [Source("big", "big.txt", 5.0), Source("mid", "mid.txt", 3.0), Source("small", "small.txt", 2.0)]
SIZES = [1000, 300, 50]


def order(batch: int = 16, per_epoch: int = 40) -> MixtureOrder:
    return MixtureOrder(MixedSequences([Sized(n) for n in SIZES]), SOURCES, seed=3, global_batch=batch,
                        batches_per_epoch=per_epoch)


def source_of(index: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(SIZES), index, side="right")


def test_every_prefix_of_batches_holds_each_share_within_one_sequence():
    mix, shares = order(), np.array([0.5, 0.3, 0.2])
    drawn = np.zeros(3, dtype=np.int64)
    for g in range(300):
        batch = mix.batch(g)
        assert len(batch) == 16
        drawn += np.bincount(source_of(batch), minlength=3)
        assert np.all(np.abs(drawn - shares * 16 * (g + 1)) < 1 + 1e-9), (g, drawn)


def test_each_source_passes_through_all_its_sequences_in_a_fresh_order_each_pass():
    mix = order()
    small = np.concatenate([b[source_of(b) == 2] for b in (mix.batch(g) for g in range(60))]) - 1300
    first, second = small[:50], small[50:100]  # the small source's first two passes (3.2 a batch)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(50))
    assert first.tolist() != second.tolist()


def test_sources_are_spread_over_the_batch_so_every_rank_sees_each():
    batch = order(batch=20).batch(7)  # 10 big, 6 mid, 4 small
    for half in (batch[:10], batch[10:]):  # two ranks' slices
        assert np.bincount(source_of(half), minlength=3).tolist() == [5, 3, 2]


def test_a_resumed_epoch_draws_exactly_the_rest():
    mix = order()
    mix.set_epoch(2)
    whole = list(mix)
    mix.set_epoch(2, skip_batches=13)
    assert list(mix) == whole[13 * 16:] and len(mix) == len(whole) - 13 * 16
    mix.set_epoch(1)
    assert list(mix) != whole  # another epoch, other batches


def test_a_global_batch_too_small_for_the_sources_is_refused():
    with pytest.raises(ConfigError, match="needs a global batch of at least 4 sequences"):
        check_batch(SOURCES, 3)
    check_batch(SOURCES, 4)


def test_the_spec_inline_and_in_yaml(tmp_path):
    assert parse_mixture("data/wiki.txt:3, code/:1") == [Source("wiki", "data/wiki.txt", 3.0),
                                                         Source("code", "code/", 1.0)]
    # a name keeps what follows its last dot unless that is an extension
    assert [s.name for s in parse_mixture("licenses/Apache-2.0:1,data/v1.2/:1")] == ["Apache-2.0", "v1.2"]
    (tmp_path / "mix.yaml").write_text("- {dataset: a.jsonl, weight: 2, text_column: body}\n"
                                       "- {dataset: user/hub-set, weight: 1, name: hub, dataset_config: en}\n")
    assert parse_mixture(str(tmp_path / "mix.yaml")) == [Source("a", "a.jsonl", 2.0, "body"),
                                                         Source("hub", "user/hub-set", 1.0, None, "en")]


@pytest.mark.parametrize("spec, message", [
    ("a.txt:1", "needs two sources or more"),
    ("a.txt,b.txt:1", "has no weight: write SPEC:WEIGHT"),
    ("a.txt:0,b.txt:1", "must be a positive number"),
    ("a.txt:heavy,b.txt:1", "is 'heavy', not a number"),
    ("x/a.txt:1,y/a.txt:1", "two sources are named a"),
])
def test_bad_specs_name_the_fix(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_mixture(spec)


def test_a_yaml_mixture_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "mix.yaml").write_text("- {dataset: a.txt, weight: 1}\n- {dataset: b.txt, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"source 2 \(b.txt\) has no weight, unknown key 'wieght' \(did you mean "
                                          r"weight\?\): each source needs"):
        parse_mixture(str(tmp_path / "mix.yaml"))


# ----------------------------------------------------------------------------- a mixture trains and resumes

def write_sources(folder) -> str:
    """Two text sources that a byte model tells apart, and the mixture spec naming them."""
    rng = np.random.default_rng(0)
    (folder / "prose.txt").write_text("\n".join(" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat"], 8))
                                                for _ in range(900)))
    (folder / "digits.txt").write_text("\n".join(" ".join(map(str, rng.integers(0, 999, 8))) for _ in range(300)))
    return f"{folder / 'prose.txt'}:3,{folder / 'digits.txt'}:1"


@pytest.mark.launch
def test_a_mixture_reports_each_source_and_resumes_exactly_on_two_ranks(tmp_path):
    spec = write_sources(tmp_path)
    common = [*TINY_GPT, "--tokenizer", "byte", "--mixture", spec, "--tokens_dir", str(tmp_path / "tokens"),
              "--max_steps", "8", "--batch_size", "4", "--eval_every", "4", "--eval_batches", "2"]
    reference = run_ok([*common, "--output_dir", str(tmp_path / "one"), "--batch_size", "8"], cwd=tmp_path)
    assert "mixture: prose 75% of tokens" in reference.stdout + reference.stderr
    crash = faults.inject(faults.crash_rank_once, rank=1, micro_step=7, marker=str(tmp_path / "crashed"))
    args = [*common, "--output_dir", str(tmp_path / "two"), "--save_every", "5"]
    assert launch(args, cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT, env=crash).returncode != 0
    run_ok(args, cwd=tmp_path, nproc=2, launcher="torchrun", script=faults.SCRIPT, env=crash)
    one = {row["step"]: row for row in read_metrics(tmp_path / "one")}
    two = {row["step"]: row for row in read_metrics(tmp_path / "two")}  # the resumed steps replace the lost ones
    for step in range(1, 9):
        assert two[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=1e-5), step
    evaluated = one[8]
    assert {"val/loss", "val/prose/loss", "val/digits/loss", "val/prose/acc"} <= set(evaluated)
    assert evaluated["val/digits/loss"] != evaluated["val/prose/loss"]
    low, high = sorted([evaluated["val/prose/loss"], evaluated["val/digits/loss"]])
    assert low <= evaluated["val/loss"] <= high  # over every source's tokens
    assert two[8]["val/prose/loss"] == pytest.approx(evaluated["val/prose/loss"], rel=1e-5)
