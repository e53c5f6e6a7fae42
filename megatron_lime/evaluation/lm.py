"""LIME as an lm-evaluation-harness model: `simple_evaluate(model="lime", model_args="load=PATH")` after importing
this module.

LimeLM scores with our own LimeModel forward, in process, from any checkpoint layout
megatron_lime.checkpoint.load_model reads (a DeepSpeed save dir of any data-parallel size, a
consolidated directory, an exported Hugging Face folder; verified against their content hashes),
or from a live model handed over by the trainer.

Agreement with lm-eval's own `--model hf` on an export is by construction where it matters:
  * context/continuation split: TemplateLM.loglikelihood / _encode_pair, inherited unchanged
    (trailing spaces of the context move to the continuation; the pair is encoded whole and
    the context's token count splits it);
  * an empty context is conditioned on `prefix_token_id` (our tokenizers have no BOS: eos);
  * rolling log-likelihood uses lm-eval's own window functions with max_length = the model's
    positions;
  * inputs longer than max_length + 1 are cut from the left, as HFLM does.
Batches are right-padded: with causal attention a pad after the real tokens never reaches
them, and only positions inside each request are read back, so padding never enters a score.
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval fills its model registry only while empty: let it, before we add ours
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

DEFAULT_MAX_GEN_TOKS = 256
# Generation settings a task may give, and the values that still mean plain greedy decoding.
GREEDY_SETTINGS = {"do_sample": (False, None), "temperature": (0, 0.0, None), "num_beams": (1, None),
                   "repetition_penalty": (1, 1.0, None), "no_repeat_ngram_size": (0, None)}


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (CPU bf16 is emulated and slow), bf16 on GPUs that support it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}


@register_model("lime")
class LimeLM(TemplateLM):
    """lm-eval model over a LimeModel and a megatron_lime tokenizer.

    From the command line: `load=PATH[,tokenizer=DIR][,batch_size=N][,device=cpu|cuda][,dtype=fp32|bf16][,tag=T]`.
    In process: `LimeLM(model=model, tokenizer=tokenizer)` (training passes its live model; with
    `rank`/`world_size` set, lm-eval splits the requests over the ranks and gathers the results).
    """

    def __init__(self, load: str | None = None, tokenizer: Any = None, model: torch.nn.Module | None = None,
                 batch_size: int | str = 8, device: str | None = None, dtype: str | torch.dtype | None = None,
                 tag: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 rank: int = 0, world_size: int = 1, **unused: Any):
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size=auto is not supported by the lime model: give a number")
        self._device = torch.device(device) if device else (
            next(model.parameters()).device if model is not None else
            torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            dtype = _DTYPES[dtype]
        self.metadata: dict[str, Any] = {}
        if model is None:
            if load is None:
                raise ValueError("the lime model needs load=PATH (a checkpoint or an exported folder)")
            from megatron_lime.checkpoint import load_model

            loaded = load_model(load, tag=tag, tokenizer=tokenizer if isinstance(tokenizer, str) else None,
                                device=self._device, dtype=dtype or default_dtype(self._device))
            model, tokenizer = loaded.model, loaded.tokenizer
            self.metadata = dict(loaded.metadata, source=loaded.source, kind=loaded.kind)
        elif tokenizer is None or isinstance(tokenizer, str):
            from megatron_lime.tokenizer import load_tokenizer

            if tokenizer is None:
                raise ValueError("LimeLM(model=...) needs its tokenizer")
            tokenizer = load_tokenizer(tokenizer)
        self.model = model
        self.lime_tokenizer = tokenizer
        self.batch_size_per_device = int(batch_size)
        self.max_length = model.config.max_position_embeddings
        self.max_gen_toks = int(max_gen_toks)
        self._rank, self._world_size = rank, world_size

    # ---- what lm-eval asks of every model

    @property
    def eot_token_id(self) -> int:
        return self.lime_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.lime_tokenizer.eos_id  # our tokenizers have no BOS; HFLM also falls back to eos

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.lime_tokenizer, "path", "lime")).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.lime_tokenizer.encode(string)  # raw text: no special tokens are ever added

    def tok_decode(self, tokens: list[int]) -> str:
        return self.lime_tokenizer.decode(tokens)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self._world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self._world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- scoring

    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> torch.Tensor:
        """fp32 log-softmax for a right-padded batch: (b, longest, vocab)."""
        longest = max(len(s) for s in sequences)
        pad = self.lime_tokenizer.pad_id
        input_ids = torch.tensor([s + [pad] * (longest - len(s)) for s in sequences], dtype=torch.long,
                                 device=self._device)  # (b, s)
        logits = self.model(input_ids).logits  # (b, s, vocab)
        return F.log_softmax(logits.float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding gives the continuation) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: a batch's first element fixes its padded length, and memory errors come early.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        progress = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size_per_device):
            batch = order[start:start + self.batch_size_per_device]
            inputs, continuations = [], []
            for i in batch:
                _, context_enc, continuation_enc = requests[i]
                if not context_enc or not continuation_enc or len(continuation_enc) > self.max_length:
                    raise ValueError(f"request {requests[i][0]!r}: empty context or continuation, or a continuation "
                                     f"longer than the model's {self.max_length} positions")
                # The last token is only predicted, never read; longer inputs lose their left end.
                inputs.append((context_enc + continuation_enc)[-(self.max_length + 1):][:-1])
                continuations.append(continuation_enc)
            logprobs = self._logprobs(inputs)
            for row, i, tokens, continuation in zip(logprobs, batch, inputs, continuations):
                # Positions len(tokens) - len(cont) .. len(tokens) - 1 predict the continuation.
                predicted = row[len(tokens) - len(continuation):len(tokens)]  # (cont, vocab)
                target = torch.tensor(continuation, device=predicted.device)
                score = predicted.gather(1, target[:, None]).sum().item()
                results[i] = (score, bool((predicted.argmax(-1) == target).all()))
                progress.update(1)
        progress.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of max_length tokens (perplexity tasks)."""
        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((None, None), context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[owner] += score
        return totals

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string (or eos, or max_gen_toks), batched.

        Right-padded like scoring: each sequence's next token is read at its own last position,
        and pads behind it are never attended to (causal). No KV cache: the small models this
        runs on in process do not need one.
        """
        results: list[str | None] = [None] * len(requests)
        eos_text = self.tok_decode([self.eot_token_id])
        order = sorted(range(len(requests)), key=lambda i: -len(self.tok_encode(requests[i].args[0])))
        progress = tqdm(total=len(requests), disable=disable_tqdm or self._rank != 0, desc="generate_until")
        for start in range(0, len(order), self.batch_size_per_device):
            batch = order[start:start + self.batch_size_per_device]
            for group in _same_settings(batch, requests):
                self._generate_group(group, requests, results, eos_text)
            progress.update(len(batch))
        progress.close()
        return results

    def _generate_group(self, group: list[int], requests, results: list, eos_text: str) -> None:
        settings = dict(requests[group[0]].args[1])
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        if eos_text not in until:
            until.append(eos_text)
        until = [stop for stop in until if stop]  # an empty stop string (eos decoding to "") would stop at once
        max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
        not_greedy = [k for k, neutral in GREEDY_SETTINGS.items() if k in settings and settings[k] not in neutral]
        if not_greedy:
            raise ValueError(f"the lime model decodes greedily only; the task asks for "
                             f"{ {k: settings[k] for k in not_greedy} }")
        max_context = self.max_length - max_new
        if max_context <= 0:
            raise ValueError(f"max_gen_toks {max_new} leaves no room for a context in {self.max_length} positions")
        sequences = [self.tok_encode(requests[i].args[0])[-max_context:] for i in group]
        generated: list[list[int]] = [[] for _ in group]
        done = [False] * len(group)
        for _ in range(max_new):
            active = [k for k in range(len(group)) if not done[k]]
            if not active:
                break
            logprobs = self._logprobs([sequences[k] + generated[k] for k in active])
            for row, k in zip(logprobs, active):
                token = int(row[len(sequences[k]) + len(generated[k]) - 1].argmax())
                generated[k].append(token)
                if token == self.eot_token_id or any(s in self.tok_decode(generated[k]) for s in until):
                    done[k] = True
        for k, i in enumerate(group):
            text = self.tok_decode(generated[k])
            for stop in until:  # the text before the first stop string, as HFLM returns it
                text = text.split(stop)[0]
            results[i] = text


def _same_settings(batch: list[int], requests) -> list[list[int]]:
    """Split a batch into runs of requests with identical generation settings."""
    groups: dict[str, list[int]] = {}
    for i in batch:
        groups.setdefault(repr(sorted(requests[i].args[1].items())), []).append(i)
    return list(groups.values())
