"""Text the model writes: `lmdist generate`'s loop, and the samples a run takes while it trains.

At each evaluation (or every `sample_every` steps) the training run continues each of `sample_prompts`
by `sample_tokens` tokens, so that a person watches the model learn to write: rank zero logs the rows
(step, prompt, text) to `<output_dir>/samples.jsonl` and to W&B as a Table.

Invariants:
- Sampling never changes training: it draws from its own generator, seeded afresh from `seed` for every
  prompt at every sampling step (so the text changes only because the weights do), runs the model in
  eval mode without gradients, and restores train mode. A stopped and resumed run samples the same
  text at the same steps as an uninterrupted one.
- It runs on the model's own module, outside DDP and torch.compile (growing contexts would recompile
  at every length): rank zero alone, or every rank together when the model is sharded (FSDP needs
  each rank in every forward), under the run's autocast.
- No key/value cache: each new token re-reads the last `block_size` tokens, as `generate` does; the
  cost is `sample_tokens` forwards per prompt, outside tokens/s.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lmdist import engine
from lmdist.config import TrainConfig
from lmdist.tokenizer import Tokenizer

TOP_K = 50  # the samples' candidates per token: cuts the long tail of a model that is still learning


@torch.no_grad()
def continue_ids(model: torch.nn.Module, ids: list[int], max_new_tokens: int, block_size: int, vocab_size: int,
                 temperature: float, top_k: int, generator: torch.Generator, device: torch.device) -> list[int]:
    """The `max_new_tokens` token ids that follow `ids`: top_k 1 or temperature 0 is greedy, else a seeded draw
    from the temperature-scaled top_k (0: all) logits; padding rows of the vocabulary are never drawn."""
    context = torch.tensor([ids], device=device)  # (1, time)
    for _ in range(max_new_tokens):
        logits = model(context[:, -block_size:])[0, -1, :vocab_size].float()  # the last position's (vocab,)
        if top_k:
            threshold = torch.topk(logits, min(top_k, logits.numel())).values[-1]
            logits[logits < threshold] = -float("inf")
        if temperature == 0:
            token = logits.argmax().reshape(1)
        else:
            token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=generator)
        context = torch.cat([context, token[None]], dim=1)
    return context[0, len(ids):].tolist()


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's ids; an empty prompt starts from the end-of-text token, as a document does."""
    return tokenizer.encode(prompt) or [tokenizer.eos_id or 0]


def prompts_of(cfg: TrainConfig) -> list[str]:
    """The run's sample prompts (`|`-separated), none when sampling is off."""
    if cfg.sample_tokens == 0 or cfg.sample_every == 0:
        return []
    return cfg.sample_prompts.split("|")


class Sampler:
    """The samples of one training run: which steps take them, and the text at such a step."""

    def __init__(self, cfg: TrainConfig, tokenizer: Tokenizer, accelerator):
        self.cfg, self.tokenizer, self.accelerator = cfg, tokenizer, accelerator
        self.prompts = prompts_of(cfg)

    def due(self, step: int, evaluated: bool, last: bool) -> bool:
        """Whether `step` takes samples: at each evaluation by default, else every sample_every steps and last."""
        if not self.prompts:
            return False
        if self.cfg.sample_every is None:
            return evaluated
        return step % self.cfg.sample_every == 0 or last

    def sample(self, model: torch.nn.Module, step: int) -> list[dict] | None:
        """Rows {step, prompt, text} of every prompt on rank zero; None on other ranks. Every rank calls it."""
        accelerator = self.accelerator
        module = accelerator.unwrap_model(model, keep_torch_compile=False)
        if not (accelerator.is_main_process or engine.shards_model(accelerator)):
            return None  # DDP's module is whole on rank zero: the others go on to the next step
        was_training = module.training
        module.eval()
        rows = []
        try:
            with accelerator.autocast():
                for number, prompt in enumerate(self.prompts):
                    generator = torch.Generator(accelerator.device).manual_seed(self.cfg.seed + number)
                    ids = continue_ids(module, prompt_ids(self.tokenizer, prompt), self.cfg.sample_tokens,
                                       self.cfg.block_size, self.tokenizer.vocab_size, self.cfg.sample_temperature,
                                       TOP_K, generator, accelerator.device)
                    rows.append({"step": step, "prompt": prompt, "text": self.tokenizer.decode(ids)})
        finally:
            module.train(was_training)
        return rows if accelerator.is_main_process else None
