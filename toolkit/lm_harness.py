"""An lm-evaluation-harness model: ``lm_eval --model playattention --model_args run=RUN_DIR --tasks ...``.

``PlayAttentionLM`` is an ``lm_eval.api.model.LM`` registered as ``playattention``; ``run`` is a
finished run folder, a checkpoint of one (``RUN@best``) or a Hugging Face folder (:func:`toolkit.evaluate.load_target`);
``device`` is CUDA where there is one, else the CPU, unless told.
Log-likelihoods come from :func:`toolkit.scoring.score_continuations`, the scorer of the built-in
evaluators, with the context and the continuation encoded apart as the ``hellaswag`` evaluator
encodes them, so both give the same numbers on the same inputs.

lm-eval is the optional extra ``eval`` (``pip install 'playattention[eval]'``); nothing in the
toolkit imports this module. How lm-eval finds it:

- lm-eval releases with plugin discovery read the ``lm_eval.models`` entry point that this package
  declares, so ``lm_eval run --model playattention ...`` works as it is;
- lm-eval 0.4.13 (the newest release as this is written) has no such discovery:
  ``python -m toolkit.lm_harness ARGS`` is its ``lm_eval ARGS`` with this model registered, and
  from Python ``import toolkit.lm_harness`` before ``lm_eval.simple_evaluate(model="playattention", ...)``.
"""
from __future__ import annotations

import sys

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from .evaluate import load_target
from .scoring import score_continuations


def pick_device(device: str | None) -> torch.device:
    """The device asked for, else CUDA where there is one, else the CPU. lm-eval asks for cuda:0 unless told
    otherwise, so a CUDA device on a machine without CUDA means nobody chose it: the CPU, said once."""
    if device and str(device).startswith("cuda") and not torch.cuda.is_available():
        print(f"note: no CUDA on this machine: running on the CPU, not {device}", file=sys.stderr)
        device = "cpu"
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


@register_model("playattention")
class PlayAttentionLM(LM):
    """A playattention run (or Hugging Face GPT-2 folder) as an lm-evaluation-harness model."""

    def __init__(self, run: str, device: str | None = None, batch_size: int | str = 16, **_ignored):
        super().__init__()
        self._device = pick_device(device)
        self.model, self.tokenizer, self.recipe, _ = load_target(run, self._device)
        self.block_size = self.recipe.model.block_size
        # "auto" (lm-eval's batch-size search) is not supported: a fixed size, or 16
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    # -- tokens --------------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation tokens, each encoded alone (as the hellaswag evaluator does); an
        empty context is end-of-text, or without one the continuation's first token."""
        if context and context != context.rstrip():  # "Answer: " + "Paris": the space goes with the word
            n = len(context) - len(context.rstrip())
            context, continuation = context[:-n], context[-n:] + continuation
        cont = self.tokenizer.encode(continuation)
        if context:
            return self.tokenizer.encode(context), cont
        if self.tokenizer.eot is not None:
            return [self.tokenizer.eot], cont
        return cont[:1], cont[1:]

    def score(self, requests: list[tuple[list[int], list[int]]]) -> list:
        return score_continuations(self.model, requests, block_size=self.block_size, batch_size=self.batch_size,
                                   device=self._device)

    # -- the three request types ------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives it) per request."""
        pairs = [self.encode_pair(*req.args) for req in tqdm(requests, disable=disable_tqdm, desc="encoding")]
        return [(s.logprob, s.greedy) for s in self.score(pairs)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) of each whole text, in windows of block_size tokens that each predict new tokens."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            (text,) = req.args[:1]
            ids = self.tokenizer.encode(text)
            prefix, ids = (self.tokenizer.eot, ids) if self.tokenizer.eot is not None else (ids[0], ids[1:])
            windows = [make_disjoint_window(w) for w in
                       get_rolling_token_windows(ids, prefix_token=prefix, max_seq_len=self.block_size, context_len=1)]
            # a disjoint window is (context, tokens to predict): exactly a scorer request
            out.append(sum(s.logprob for s in self.score(windows)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) text after each context, cut at the first stop string."""
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generating"):
            context, kwargs = req.args[0], dict(req.args[1])
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tokenizer.encode(context) or [self.tokenizer.eot if self.tokenizer.eot is not None else 0]
            idx = torch.tensor([ids[-self.block_size:]], dtype=torch.long, device=self._device)  # (1, T)
            new = self.model.generate(idx, max_new, temperature=temperature, seed=0)[0, idx.size(1):].tolist()
            text = self.tokenizer.decode(new)
            cut = min([i for i in (text.find(s) for s in until) if i >= 0], default=len(text))
            out.append(text[:cut])
        return out


def main(argv: list[str] | None = None) -> None:
    """lm-eval's command line, with ``--model playattention`` registered (and the default model)."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if "--model" not in args and not any(a.startswith("--model=") for a in args):
        args = [*args, "--model", "playattention"]
    if "--device" not in args and not any(a.startswith("--device=") for a in args):  # lm-eval's default is cuda:0
        args = [*args, "--device", str(pick_device(None))]
    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
