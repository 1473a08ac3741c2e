"""Generation for chat: one sampling loop for Hugging Face models and nblib's GPT, stop strings,
streaming, and a chat history that fits the context window.

The loop feeds the prompt once, then one token at a time through the model's KV cache
(``past_key_values`` for a Hugging Face model, ``KVCache`` for nblib's GPT), computes logits
for the last position only, and picks each token with :func:`nblib.sampling.sample_next`. The generated ids go through a
:class:`StopScanner`: it decodes them, stops at the first stop string (also one spread over
several tokens) and releases text only once no later token can change it. The streamed text is
therefore exactly the returned text: a stop marker never shows, not even half of one.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import StoppingCriteria

from nblib.decode import DecodeStep
from nblib.dialogue import ASSISTANT, EOT, USER, clean_text, prompt_ids
from nblib.sampling import sample_next

CHAT_STOPS = (EOT, USER, ASSISTANT)
"""A reply ends at end-of-text; a role marker means the model started another turn."""

_TRAILING_WORD = re.compile(r"\w+\Z")

Stream = Callable[[str], None]


def find_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """``(index, stop)`` of the earliest stop string in ``text``, or ``None``."""
    hits = [(i, s) for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def trim(text: str, stops: Sequence[str]) -> tuple[str, str | None]:
    """The part of generated ``text`` that is final, and the stop string that ended it.

    With a stop string in ``text``: everything before the first one. Without: ``text`` minus the
    tail a further token could still change, i.e. a suffix that may begin a stop string
    (``"<|us"``), an incomplete UTF-8 character (decoded as U+FFFD) and an unfinished word.
    When generation ends on the token budget, this is the answer: no half marker, no half word.
    """
    hit = find_stop(text, stops)
    if hit is not None:
        return text[: hit[0]], hit[1]
    end = len(text)
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):  # longest suffix that starts `stop`
            if text.endswith(stop[:k]):
                end = min(end, len(text) - k)
                break
    kept = text[:end].rstrip("\ufffd")
    word = _TRAILING_WORD.search(kept)
    return (kept[: word.start()] if word else kept), None


class StopScanner:
    """Turns generated token ids into final text, one token at a time.

    ``push`` returns the text that token releases (often ``""`` while a word or a possible stop
    marker is pending). Once a stop string appears, ``stopped_on`` is set and the released text
    ends right before it; the concatenated releases always equal ``text``.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]):
        self.decode = decode
        self.stops = tuple(stops)
        self.ids: list[int] = []
        self.text = ""
        self.stopped_on: str | None = None

    def push(self, token_id: int) -> str:
        if self.stopped_on is not None:
            raise RuntimeError(f"generation already stopped on {self.stopped_on!r}; start a new StopScanner")
        self.ids.append(token_id)
        final, self.stopped_on = trim(self.decode(self.ids), self.stops)
        released = final[len(self.text) :]
        self.text = final
        return released


def hf_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """Exact decoding for a Hugging Face tokenizer: special tokens kept, no space clean-up."""
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class StopOnStrings(StoppingCriteria):
    """Stop criterion for ``model.generate`` (Hugging Face) on stop strings, also multi-token ones.

    ``prompt_length`` is the prompt's length in tokens (only generated text is searched). Trim
    the decoded output with :func:`trim`::

        out = model.generate(ids, stopping_criteria=[StopOnStrings(tok, ids.shape[1])], ...)
        text, stop = trim(hf_decoder(tok)(out[0, ids.shape[1]:].tolist()), CHAT_STOPS)
    """

    def __init__(self, tokenizer: Any, prompt_length: int, stops: Sequence[str] = CHAT_STOPS):
        self.decode = hf_decoder(tokenizer)
        self.prompt_length = prompt_length
        self.stops = tuple(stops)

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = [find_stop(self.decode(row[self.prompt_length :].tolist()), self.stops) is not None for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def context_length(model: torch.nn.Module) -> int:
    """Most positions ``model`` accepts: nblib GPT's ``context_length`` or HF's ``max_position_embeddings``."""
    cfg = model.config
    return cfg.context_length if hasattr(cfg, "context_length") else cfg.max_position_embeddings


def _next_logits(model: torch.nn.Module, max_len: int, compile: bool | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``step(ids) -> logits`` of the last position after appending ``ids`` to the model's KV cache."""
    if hasattr(model, "new_cache"):  # nblib GPT
        one_token = DecodeStep.new(model, 1, max_len, compile)
        cache = one_token.cache

        def step(ids: torch.Tensor) -> torch.Tensor:
            if ids.size(1) == 1 and cache.length:
                return one_token(ids)
            logits, _ = model(ids, cache=cache, last_only=True)  # the prompt; the LM head only where we sample
            return logits[:, -1, :]

        return step
    past = None

    def step_hf(ids: torch.Tensor) -> torch.Tensor:
        nonlocal past
        out = model(input_ids=ids, past_key_values=past, use_cache=True, logits_to_keep=1)
        past = out.past_key_values
        return out.logits[:, -1, :]

    return step_hf


@dataclass
class Generation:
    """One generation: the final ``text``, why it ended and how fast it went."""

    text: str
    token_ids: list[int]  # generated ids, including any that formed the stop string
    stopped_on: str | None  # the stop string met, or None when the token budget ran out
    prompt_tokens: int
    seconds: float

    @property
    def truncated(self) -> bool:
        """The budget ran out before a stop: the unfinished last word was dropped."""
        return self.stopped_on is None

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else float("nan")


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stops: Sequence[str] = (EOT,),
    stream: Stream | None = None,
    compile: bool | None = None,
) -> Generation:
    """Continue ``prompt`` (text or token ids) until a stop string or ``max_new_tokens``.

    ``model`` is a Hugging Face causal LM or an nblib ``GPT``; ``tokenizer`` a Hugging Face
    tokenizer with the same ids (``nblib.tokenizer.hf_tokenizer()`` for nblib's GPT).
    ``temperature=0`` is greedy; ``seed`` makes sampling repeatable. The repetition penalty only
    sees generated tokens: the prompt's history ends each answer with end-of-text, and penalising
    that token would teach the model not to stop. ``stream`` receives text as it becomes final.
    ``compile`` (nblib's GPT only): compile the one-token step; ``None``: the device's default (``nblib.decode.use_compile``).
    """
    ids = tokenizer.encode(prompt, add_special_tokens=False) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise ValueError("the prompt is empty; give at least one token to continue from")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    room = context_length(model) - len(ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens but the model's context is {context_length(model)}; "
            "shorten it (ChatSession drops the oldest turns for you)"
        )
    budget = min(max_new_tokens, room)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    scanner = StopScanner(hf_decoder(tokenizer), stops)
    step = _next_logits(model, len(ids) + budget, compile)

    was_training = model.training
    model.eval()  # no dropout while generating
    t0 = time.perf_counter()
    generated = torch.empty(1, budget, dtype=torch.long, device=device)  # the repetition penalty's history
    logits = step(torch.tensor([ids], device=device))
    for n in range(budget):
        token = sample_next(logits, temperature, top_k, top_p, repetition_penalty, generated[:, :n], generator)
        generated[:, n : n + 1] = token
        released = scanner.push(int(token))
        if stream is not None and released:
            stream(released)
        if scanner.stopped_on is not None or len(scanner.ids) == budget:
            break
        logits = step(token)
    seconds = time.perf_counter() - t0
    model.train(was_training)
    return Generation(scanner.text, scanner.ids, scanner.stopped_on, len(ids), seconds)


def fit_history(
    tokenizer: Any, turns: list[dict[str, str]], message: str, context: int, max_new_tokens: int
) -> tuple[list[int], int]:
    """Token ids of the generation prompt for ``message`` after ``turns``, leaving ``max_new_tokens``
    of the model's ``context`` for the answer.

    The oldest exchanges (a user turn and its answer) are dropped whole until the prompt fits,
    so no turn is ever cut. Returns the ids and the number of turns dropped.
    """
    if len(turns) % 2 or any(t["role"] != ("user", "assistant")[i % 2] for i, t in enumerate(turns)):
        raise ValueError("turns must alternate user, assistant, ... and end with an assistant turn")
    question = {"role": "user", "content": message}
    room = context - max_new_tokens
    for start in range(0, len(turns) + 1, 2):
        ids = prompt_ids([*turns[start:], question], tokenizer)  # the messages' text never becomes a marker
        if len(ids) <= room:
            return ids, start
    n = len(ids)
    lower = f", lower max_new_tokens (--max-new-tokens) to {context - n}" if n < context else ""
    full = ", such as the full profile's fine-tune of gpt2 (1024 tokens; `python -m nblib.pipeline --profile full` on a GPU)"
    raise ValueError(
        f"the message makes a {n}-token prompt but only {room} tokens fit: the model's context is {context} tokens, "
        f"and max_new_tokens={max_new_tokens} of them are kept for the answer. To send it, shorten it by "
        f"{n - room} token{'s' if n - room != 1 else ''}{lower} or use a model with a longer context{full if context < 1024 else ''}"
    )


def check_chat_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer without the role markers as single tokens: its model was not fine-tuned to chat."""
    for marker in (USER, ASSISTANT):
        pieces = len(tokenizer.encode(marker, add_special_tokens=False))
        if pieces != 1:
            raise ValueError(
                f"the tokenizer has no {marker} token (it splits it into {pieces} pieces): this is not a chat "
                "fine-tune. Use a model written by notebooks/05_finetune_lora_8bit.ipynb (merged/ or adapter/)"
            )


@dataclass
class Reply:
    """The assistant's answer to one message."""

    text: str
    generation: Generation
    dropped_turns: int  # old turns left out of the prompt to fit the context

    @property
    def truncated(self) -> bool:
        return self.generation.truncated


class ChatSession:
    """A conversation in the training format: each ``ask`` renders the history plus the new
    message, generates until end-of-text or a role marker, and records both turns.

    Sampling options (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``,
    ``repetition_penalty``, ``seed``) are those of :func:`generate`; with a ``seed``, reply
    ``n`` uses ``seed + n``, so a scripted conversation is repeatable.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, stops: Sequence[str] = CHAT_STOPS, **options: Any):
        check_chat_tokenizer(tokenizer)
        max_new_tokens = options.get("max_new_tokens", 128)
        if max_new_tokens >= context_length(model):
            raise ValueError(
                f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                f"{context_length(model)}-token context; lower it"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.stops = tuple(stops)
        self.options = {**options, "max_new_tokens": max_new_tokens}
        self.turns: list[dict[str, str]] = []
        self.conversation = 1  # counts resets, for transcripts
        self.replies = 0

    def reset(self) -> None:
        """Forget the conversation and start the next one (the seed sequence goes on)."""
        self.turns = []
        self.conversation += 1

    def ask(self, message: str, stream: Stream | None = None) -> Reply:
        """Answer ``message`` (cleaned like the training questions: no role markers, HTML or control characters)."""
        message = clean_text(message)
        if not message:
            raise ValueError("the message is empty (once role markers, HTML and control characters are removed)")
        context, max_new_tokens = context_length(self.model), self.options["max_new_tokens"]
        ids, dropped = fit_history(self.tokenizer, self.turns, message, context, max_new_tokens)
        options = dict(self.options)
        if options.get("seed") is not None:
            options["seed"] += self.replies
        out = generate(self.model, self.tokenizer, ids, stops=self.stops, stream=_lstrip(stream), **options)
        self.replies += 1
        text = out.text.strip()
        self.turns += [{"role": "user", "content": message}, {"role": "assistant", "content": text}]
        return Reply(text, out, dropped)


def _lstrip(stream: Stream | None) -> Stream | None:
    """Wrap ``stream`` so leading whitespace (the space after ``<|assistant|>``) is not shown."""
    if stream is None:
        return None
    started = False

    def write(text: str) -> None:
        nonlocal started
        if not started:
            text = text.lstrip()
            started = bool(text)
        if text:
            stream(text)

    return write
