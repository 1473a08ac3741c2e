"""Talk to the fine-tuned assistant: load its model folder, run a scripted or live conversation,
write the transcript. From a terminal::

    python -m nblib.chat --model runs/finetune-lora-8bit/merged

Type a message and the answer streams in; ``/reset`` starts a new conversation, ``/exit``
(or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from nblib import config
from nblib.files import atomic_write_text, read_json
from nblib.generate import ChatSession, Reply, check_chat_tokenizer

PRODUCER = "notebooks/05_finetune_lora_8bit.ipynb"
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
COMMANDS = {"/reset": "start a new conversation", "/exit": "leave"}
YOU, BOT = "you> ", "bot> "


def relative(path: Path) -> str:
    """``path`` relative to the working root when it lies inside it (no machine paths in outputs)."""
    try:
        return str(path.resolve().relative_to(config.home()))
    except ValueError:
        return str(path)


def resolve(model_dir: str | os.PathLike) -> Path:
    """The folder to load: ``model_dir`` (relative paths are under the working root), or the
    ``adapter/`` beside a missing ``merged/``."""
    path = Path(model_dir).expanduser()
    path = path if path.is_absolute() else config.home() / path
    if path.is_dir():
        return path
    adapter = path.with_name("adapter")
    if path.name == "merged" and (adapter / "adapter_config.json").is_file():
        return adapter
    raise FileNotFoundError(
        f"no model folder at {relative(path)}. Run {PRODUCER} first (it writes "
        "runs/finetune-<variant>/merged/ and adapter/), or pass the folder of a merged model "
        "(config.json) or of a peft adapter (adapter_config.json)"
    )


def load(model_dir: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a merged model folder or a peft adapter folder (its base is
    loaded and the adapter merged in), in eval mode on ``device`` (default: CUDA if present)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(model_dir)
    if (path / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(path)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        raise ValueError(
            f"{relative(path)} holds neither config.json (a merged model) nor adapter_config.json "
            f"(a peft adapter); point --model/model at the merged/ or adapter/ folder that {PRODUCER} writes"
        )
    _check_chat_model(model, tokenizer, path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tokenizer


def _load_adapter(path: Path) -> tuple[Any, Any]:
    """The adapter on the base named in its ``adapter_config.json``, merged into one plain model."""
    from nblib import finetune

    try:
        model, tokenizer = finetune.load_adapter(path)
    except OSError as e:  # FileNotFoundError for a missing folder, OSError from the hub offline
        base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
        raise FileNotFoundError(
            f"the adapter at {relative(path)} needs its base model {base!r}, which could not be loaded ({e}). "
            "Restore the base (the smoke profile's is runs/pretrain-mha/hf from notebooks/03_train_mha.ipynb; "
            "a hub name needs a network or the HF cache), or load the merged/ folder instead"
        ) from e
    return model.merge_and_unload(), tokenizer


def _check_chat_model(model: Any, tokenizer: Any, path: Path) -> None:
    """Refuse a model that cannot chat: no role-marker tokens, or weights from another vocabulary."""
    try:
        check_chat_tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"{relative(path)}: {e}") from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(
            f"{relative(path)}: the model has {rows} token embeddings but its tokenizer has "
            f"{len(tokenizer)} tokens; the weights and the tokenizer come from different models"
        )


def session(model: Any, tokenizer: Any, cfg: dict[str, Any]) -> ChatSession:
    """A :class:`ChatSession` with the generation settings of ``cfg`` (a ``chat`` profile)."""
    return ChatSession(model, tokenizer, **{k: cfg[k] for k in GENERATION_KEYS})


def _print(text: str) -> None:
    print(text, end="", flush=True)


def typed_lines(prompt: str = YOU) -> Iterator[str]:
    """Lines typed at ``input(prompt)`` until end of input (Ctrl-D)."""
    while True:
        try:
            yield input(prompt)
        except EOFError:
            print()
            return


def converse(chat: ChatSession, lines: Iterable[str], echo: bool = False) -> list[dict[str, Any]]:
    """Answer each line (streaming to stdout) or run its command; stop at ``/exit``.

    ``echo`` prints each line first (for scripted input). Returns one row per exchange.
    """
    rows = []
    for line in lines:
        line = line.strip()
        if echo:
            print(YOU + line)
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            chat.reset()
            print(f"(conversation {chat.conversation})")
            continue
        if line.startswith("/"):
            print(f"unknown command {line}; commands: " + ", ".join(f"{c} ({h})" for c, h in COMMANDS.items()))
            continue
        _print(BOT)
        try:
            reply = chat.ask(line, stream=_print)
        except ValueError as e:  # an empty or too long message: say so and go on
            print(f"({e})")
            continue
        print(" […]" if reply.truncated else "", flush=True)
        rows.append(_row(chat.conversation, line, reply))
    return rows


def _row(conversation: int, message: str, reply: Reply) -> dict[str, Any]:
    g = reply.generation
    return {
        "conversation": conversation,
        "user": message,
        "assistant": reply.text,
        "stopped_on": g.stopped_on,
        "truncated": reply.truncated,
        "new_tokens": len(g.token_ids),
        "tokens_per_s": round(g.tokens_per_s, 1),
        "dropped_turns": reply.dropped_turns,
    }


def transcript(rows: list[dict[str, Any]], model_dir: str, cfg: dict[str, Any]) -> str:
    """The conversation as Markdown: settings, then each exchange with how the answer ended."""
    settings = ", ".join(f"{k}={cfg[k]}" for k in GENERATION_KEYS)
    lines = ["# Chat transcript", "", f"- model: `{model_dir}`", f"- profile: {cfg['profile']}", f"- settings: {settings}"]
    conversation = None
    for row in rows:
        if row["conversation"] != conversation:
            conversation = row["conversation"]
            lines += ["", f"## Conversation {conversation}"]
        if row["truncated"]:
            ending = "stopped at the token budget (unfinished last word dropped)"
        else:
            ending = f"stopped on `{row['stopped_on']}`"
        dropped = f", {row['dropped_turns']} old turns left out of the prompt" if row["dropped_turns"] else ""
        answer = row["assistant"].replace("\n", "  \n") or "*(empty answer)*"  # keep the answer's line breaks
        lines += [
            "",
            f"**User:** {row['user']}",
            "",
            f"**Assistant:** {answer}",
            "",
            f"<sub>{ending}; {row['new_tokens']} tokens at {row['tokens_per_s']} tokens/s{dropped}</sub>",
        ]
    return "\n".join(lines) + "\n"


def write_transcript(rows: list[dict[str, Any]], model_dir: str, cfg: dict[str, Any], path: Path | None = None) -> Path:
    """Write :func:`transcript` to ``reports/chat_transcript.md`` (or ``path``), atomically."""
    path = path or config.paths().reports / "chat_transcript.md"
    return atomic_write_text(path, transcript(rows, model_dir, cfg))


def interact(chat: ChatSession) -> Any:
    """A live chat in a notebook: an ipywidgets chat box, or an ``input()`` loop without ipywidgets."""
    try:
        import ipywidgets as widgets
    except ImportError:
        print("(ipywidgets is not installed: chatting through input(); /reset, /exit)")
        converse(chat, typed_lines())
        return None
    log = widgets.Output()
    box = widgets.Text(placeholder="message, /reset or /exit; Enter sends", continuous_update=False,
                       layout=widgets.Layout(width="100%"))

    def send(change: dict[str, Any]) -> None:
        line = change["new"].strip()
        if not line:
            return
        box.value = ""
        with log:
            converse(chat, [line], echo=True)
        if line == "/exit":
            box.disabled = True

    box.observe(send, names="value")
    return widgets.VBox([log, box])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nblib.chat",
        description="Chat with the fine-tuned assistant: answers stream in; /reset starts a new conversation, "
        "/exit (or Ctrl-D) leaves.",
    )
    parser.add_argument("--model", help="merged model or peft adapter folder (default: runs/finetune-lora-8bit/merged)")
    parser.add_argument("--profile", default="auto", help="chat settings profile: smoke, full or auto")
    parser.add_argument("--device", help="cpu, cuda, ... (default: CUDA if present)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy")
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--repetition-penalty", type=float)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    cfg = config.settings("chat", args.profile, model=args.model, **{k: getattr(args, k) for k in GENERATION_KEYS})
    try:
        chat = session(*load(cfg["model"], args.device), cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"chat: {e}", file=sys.stderr)
        return 2
    print(f"model {cfg['model']}; " + ", ".join(f"{c} to {h}" for c, h in COMMANDS.items()), flush=True)
    try:
        converse(chat, typed_lines())
    except KeyboardInterrupt:
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
