"""Talk to the fine-tuned assistant: load its model folder, run a scripted or live conversation,
write the transcript. From a terminal::

    python -m nblib.chat --model runs/finetune-lora-8bit/seed-1234/merged

Type a message and the answer streams in; ``/help`` lists the commands (``/reset`` starts a new
conversation, ``/exit`` or Ctrl-D leaves). Ctrl-C stops the answer that streams, at an empty
prompt it leaves. On a POSIX terminal, keys typed while an answer
streams are not echoed into it: they start the next prompt line, ready to edit or send.
"""
from __future__ import annotations

import argparse
import difflib
import html
import io
import os
import re
import select
import signal
import sys
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from nblib import config, machine
from nblib.files import atomic_write_text, read_json
from nblib.generate import ChatSession, Reply, check_chat_tokenizer, context_length

PRODUCER = "notebooks/05_finetune_lora_8bit.ipynb"
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")
COMMANDS = {
    "/help": "list the commands and the generation settings",
    "/reset": "start a new conversation",
    "/exit": "leave (Ctrl-D too)",
}
YOU, BOT = "you> ", "bot> "
EMPTY_ANSWER = "(empty answer)"  # shown in the terminal and the transcript for an answer with no text
STOPPED = "(stopped)"  # shown after an answer that Ctrl-C stopped
_ESCAPE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|O.|.)?")  # the sequences of arrow, function and Alt keys


def resolve(model_dir: str | os.PathLike) -> Path:
    """The folder to load: ``model_dir`` (relative paths are under the working root), or the
    ``adapter/`` beside a missing ``merged/``."""
    path = config.resolve(model_dir)
    if path.is_dir():
        return path
    adapter = path.with_name("adapter")
    if path.name == "merged" and (adapter / "adapter_config.json").is_file():
        return adapter
    raise FileNotFoundError(
        f"no model folder at {config.relative(path)}. Run {PRODUCER} first (it writes "
        "runs/finetune-<variant>/merged/ and adapter/), or pass the folder of a merged model "
        "(config.json) or of a peft adapter (adapter_config.json)"
    )


def load(model_dir: str | os.PathLike, device: str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a merged model folder or a peft adapter folder (its base is
    loaded and the adapter merged in), in eval mode on ``device`` (default: CUDA if present)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nblib.ftbase import refuse_code
    from nblib.weights import check_weights, weight_files

    path = refuse_code(resolve(model_dir))
    check_weights(weight_files(path), f"run {PRODUCER} again or point --model/model at a complete folder")
    if (path / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(path)
    elif (path / "config.json").is_file():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        except (OSError, ValueError, SafetensorError) as e:  # a bad config.json, no or damaged weights
            raise ValueError(
                f"{config.relative(path)} is not a loadable merged model: {str(e).strip().rstrip('.')}. A merged/ "
                f"folder as {PRODUCER} writes it holds config.json, model.safetensors and the tokenizer files; "
                "run it again or point --model/model at a complete folder"
            ) from None
    else:
        raise ValueError(
            f"{config.relative(path)} holds neither config.json (a merged model) nor adapter_config.json "
            f"(a peft adapter); point --model/model at the merged/ or adapter/ folder that {PRODUCER} writes"
        )
    _check_chat_model(model, tokenizer, path)
    device = device or str(machine.detect().torch)
    return model.to(device).eval(), tokenizer


def _load_adapter(path: Path) -> tuple[Any, Any]:
    """The adapter on the base named in its ``adapter_config.json``, merged into one plain model."""
    from nblib import finetune

    try:
        model, tokenizer = finetune.load_adapter(path)
    except OSError as e:  # FileNotFoundError for a missing folder, OSError from the hub offline
        base = read_json(path / "adapter_config.json").get("base_model_name_or_path")
        raise FileNotFoundError(
            f"the adapter at {config.relative(path)} needs its base model {base!r}, which could not be loaded ({e}). "
            "Restore the base (the smoke profile's is runs/pretrain-mha/hf from notebooks/03_train_mha.ipynb; "
            "a hub name needs a network or the HF cache), or load the merged/ folder instead"
        ) from e
    return model.merge_and_unload(), tokenizer


def _check_chat_model(model: Any, tokenizer: Any, path: Path) -> None:
    """Refuse a model that cannot chat: no role-marker tokens, or weights from another vocabulary."""
    try:
        check_chat_tokenizer(tokenizer)
    except ValueError as e:
        raise ValueError(f"{config.relative(path)}: {e}") from None
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(
            f"{config.relative(path)}: the model has {rows} token embeddings but its tokenizer has "
            f"{len(tokenizer)} tokens; the weights and the tokenizer come from different models"
        )


def _summary(folder: Path) -> dict[str, Any]:
    """The ``summary.json`` of the run that wrote a model folder (it sits one level up), or ``{}``."""
    path = folder.parent / "summary.json"
    try:
        return read_json(path) if path.is_file() else {}
    except ValueError:
        return {}


def about(model: Any, folder: Path) -> str:
    """One line on what the model is: its fine-tune and base, parameters, pretraining tokens and profile;
    for a smoke model, that its answers are not expected to make sense."""
    params = sum(p.numel() for p in model.parameters())
    run = _summary(folder)
    if not run:
        return f"{config.relative(folder)}: {params / 1e6:.1f}M parameters (no run summary beside it to say more)"
    base = str(run.get("config", {}).get("base_model", "?"))
    pretrained = _summary(config.resolve(base)) if config.resolve(base).is_dir() else {}
    seen = pretrained.get("tokens_seen")
    tokens = f", pretrained on {seen / 1e6:.1f}M tokens" if seen and seen >= 1e6 else f", pretrained on {seen:,} tokens" if seen else ""
    line = (f"{run.get('label', 'a fine-tune')} of {base} ({params / 1e6:.1f}M parameters{tokens}), "
            f"{run.get('profile', '?')} profile")
    if run.get("profile") == "smoke":
        line += (": a tiny model trained for minutes on a CPU to test the pipeline — its answers are not expected "
                 "to make sense (the full profile trains GPT-2 small on a GPU)")
    return line


def session(model: Any, tokenizer: Any, cfg: dict[str, Any]) -> ChatSession:
    """A :class:`ChatSession` with the generation settings of ``cfg`` (a ``chat`` profile)."""
    return ChatSession(model, tokenizer, **{k: cfg[k] for k in GENERATION_KEYS})


def _print(text: str) -> None:
    print(text, end="", flush=True)


def typed(keys: str) -> str:
    """The line that ``keys``, typed without line editing, spell: backspace erases a character,
    Ctrl-U the line, line breaks become spaces; escape sequences and other control keys are dropped."""
    line = ""
    for key in _ESCAPE.sub("", keys):
        if key in "\x7f\b":
            line = line[:-1]
        elif key == "\x15":
            line = ""
        elif key in "\r\n":
            line += " "
        elif key.isprintable():
            line += key
    return line


def unread_keys(fd: int) -> str:
    """What has been typed at terminal ``fd`` and not read yet, without waiting for more."""
    data = b""
    while select.select([fd], [], [], 0)[0] and (chunk := os.read(fd, 4096)):
        data += chunk
    return data.decode(errors="ignore")


class Terminal:
    """Where the chat reads its lines. On a POSIX terminal (``fd``), keys typed while an answer
    streams are neither echoed into it nor lost: they start the next prompt line (put there by
    readline), ready to edit or send. Without ``fd`` (a pipe, a notebook, Windows): plain ``input()``."""

    def __init__(self, fd: int | None = None):
        self.fd = fd
        self.ahead = ""  # typed during the last answer, for the next prompt line

    @classmethod
    def stdin(cls) -> Terminal:
        """The terminal on standard input, or a plain one when stdin is not a terminal or there is
        no termios and readline (Windows)."""
        if not sys.stdin.isatty():
            return cls()
        try:
            import readline  # input() then edits lines (arrows, history); Windows has neither module
            import termios
        except ImportError:
            return cls()
        return cls(sys.stdin.fileno())

    def lines(self, prompt: str = YOU) -> Iterator[str]:
        """Lines typed at ``input(prompt)`` until end of input (Ctrl-D)."""
        while True:
            try:
                yield self._input(prompt)
            except EOFError:
                print()
                return

    def _input(self, prompt: str) -> str:
        """``input(prompt)`` with the typed-ahead keys already on the line."""
        if not self.ahead:
            return input(prompt)
        import readline

        ahead, self.ahead = self.ahead, ""
        readline.set_startup_hook(lambda: readline.insert_text(ahead))
        try:
            return input(prompt)
        finally:
            readline.set_startup_hook()

    @contextmanager
    def answering(self) -> Iterator[None]:
        """Around an answer: typed keys are not echoed (Ctrl-C still interrupts); afterwards they are
        kept for the next prompt line and the terminal's settings are restored, whatever happened."""
        if self.fd is None:
            yield
            return
        import termios

        saved = termios.tcgetattr(self.fd)
        quiet = termios.tcgetattr(self.fd)
        quiet[3] &= ~(termios.ECHO | termios.ICANON)  # no echo, and keys readable before Enter
        quiet[6][termios.VMIN], quiet[6][termios.VTIME] = 1, 0
        termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        try:
            yield
        finally:
            try:
                self.ahead = typed(unread_keys(self.fd))
            finally:
                termios.tcsetattr(self.fd, termios.TCSANOW, saved)


def budget(chat: ChatSession) -> str:
    """How the model's context is shared between the prompt and the answer."""
    context, answer = context_length(chat.model), chat.options["max_new_tokens"]
    return f"{context}-token context: {context - answer} for your message and the history, {answer} for each answer"


def help_text(chat: ChatSession) -> str:
    """The commands, the generation settings and the token budget."""
    commands = [f"  {c:<7} {h}" for c, h in COMMANDS.items()]
    settings = ", ".join(f"{k}={v}" for k, v in chat.options.items())
    return "\n".join(["commands:", *commands, f"settings: {settings}", budget(chat)])


def unknown(command: str) -> str:
    """The note for an unknown command, with the closest known one."""
    close = difflib.get_close_matches(command, COMMANDS, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"(unknown command {command}: {hint}/help lists the commands)"


def converse(
    chat: ChatSession,
    lines: Iterable[str],
    echo: bool = False,
    answering: Callable[[], AbstractContextManager[Any]] = nullcontext,
    interruptible: bool = False,
) -> list[dict[str, Any]]:
    """Answer each line (streaming to stdout) or run its command; stop at ``/exit``.

    ``echo`` prints each line first (for scripted input); each answer runs inside ``answering()``
    (:meth:`Terminal.answering` in the CLI). With ``interruptible`` (the CLI), Ctrl-C while an
    answer streams stops that answer and the chat goes on; the stopped exchange is left out of the
    history and the rows, as if it had not been asked: the model only ever sees finished turns, as
    in training, and a half answer (often stopped for going astray) would steer the next ones.
    Otherwise the interrupt goes on up. Returns one row per finished exchange.
    """
    rows = []
    for line in lines:
        line = line.strip()
        if echo:
            print(YOU + line)
        if not line:
            continue
        command = line.split()[0]
        if command == "/exit":
            break
        if command == "/help":
            print(help_text(chat))
            continue
        if command == "/reset":
            chat.reset()
            print(f"(conversation {chat.conversation})")
            continue
        if command.startswith("/"):
            print(unknown(command))
            continue
        try:
            with answering():
                reply = _answer(chat, line)
        except ValueError as e:  # an empty or too long message: say so and go on
            print(e)
            continue
        except KeyboardInterrupt:
            if not interruptible:
                raise
            print(flush=True)
            continue
        print(" […]" if reply.truncated else "", flush=True)
        rows.append(_row(chat.conversation, line, reply))
    return rows


def _answer(chat: ChatSession, message: str) -> Reply:
    """Ask ``message``, streaming ``bot> `` and the answer as recorded (stripped): ``bot> `` comes
    with the first piece, so a refused message is not shown as the bot's words, and whitespace
    waits for the text after it."""
    shown, held = BOT, ""

    def show(text: str) -> None:
        nonlocal shown, held
        text = held + text
        body = text.rstrip()
        held = text[len(body) :]
        if body:
            out, shown = shown + body, ""  # first: a Ctrl-C during the print must not show "bot> " again
            _print(out)

    try:
        reply = chat.ask(message, stream=show)
    except KeyboardInterrupt:  # the history is as before the message (ChatSession.ask records finished turns)
        _print((shown or " ") + STOPPED)
        raise
    if shown:  # nothing was shown: say so, as the transcript does
        _print(shown + EMPTY_ANSWER)
    return reply


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


def transcript(rows: list[dict[str, Any]], model_dir: str, cfg: dict[str, Any], described: str = "") -> str:
    """The conversation as Markdown: the model (``described``: :func:`about`), settings, then each
    exchange with how the answer ended."""
    settings = ", ".join(f"{k}={cfg[k]}" for k in GENERATION_KEYS)
    lines = ["# Chat transcript", "", f"- model: `{model_dir}`" + (f": {html.escape(described, quote=False)}" if described else ""),
             f"- profile: {cfg['profile']}", f"- settings: {settings}"]
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
        # text from the user and the model is escaped (Markdown renders raw HTML) and keeps its line breaks
        answer = html.escape(row["assistant"], quote=False).replace("\n", "  \n") or f"*{EMPTY_ANSWER}*"
        lines += [
            "",
            f"**User:** {html.escape(row['user'], quote=False)}",
            "",
            f"**Assistant:** {answer}",
            "",
            f"<sub>{ending}; {row['new_tokens']} token{'s' if row['new_tokens'] != 1 else ''} at "
            f"{row['tokens_per_s']} tokens/s{dropped}</sub>",
        ]
    return "\n".join(lines) + "\n"


def write_transcript(rows: list[dict[str, Any]], model_dir: str, cfg: dict[str, Any], path: Path | None = None,
                     described: str = "") -> Path:
    """Write :func:`transcript` to ``reports/chat_transcript.md`` (or ``path``), atomically."""
    path = path or config.paths().reports / "chat_transcript.md"
    return atomic_write_text(path, transcript(rows, model_dir, cfg, described))


def interact(chat: ChatSession) -> Any:
    """A live chat in a notebook: an ipywidgets chat box, or an ``input()`` loop without ipywidgets."""
    try:
        import ipywidgets as widgets
    except ImportError:
        print("(ipywidgets is not installed: chatting through input(); /help lists the commands)")
        converse(chat, Terminal().lines())
        return None
    log = widgets.Output()
    box = widgets.Text(placeholder="message or /help; Enter sends", continuous_update=False,
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


@config.cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nblib.chat",
        description="Chat with the fine-tuned assistant: answers stream in (Ctrl-C stops one); /help lists "
        "the commands (/reset starts a new conversation, /exit, Ctrl-D or Ctrl-C at an empty prompt leaves).",
    )
    parser.add_argument("--model", help="merged model or peft adapter folder (default: the chat profile's, runs/finetune-lora-8bit/seed-1234/merged)")
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
    if (args.device or "cuda").startswith("cuda"):
        machine.detect()  # a GPU this torch cannot run is refused before the model loads
    try:
        chat = session(*load(cfg["model"], args.device), cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"chat: {e}", file=sys.stderr)
        return 2
    print(f"model {cfg['model']}: {about(chat.model, resolve(cfg['model']))}", flush=True)
    print(f"({budget(chat)}); /help for commands", flush=True)
    if isinstance(sys.stdin, io.TextIOWrapper):  # a user's bytes: one that is not UTF-8 reads as U+FFFD, never fatal
        sys.stdin.reconfigure(errors="replace")
    terminal = Terminal.stdin()
    # Started from a shell's background job (`cmd &`, nohup), a process inherits SIGINT ignored and Python
    # then installs no KeyboardInterrupt: Ctrl-C must still stop an answer and leave at the prompt.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        converse(chat, terminal.lines(), answering=terminal.answering, interruptible=True)
    except KeyboardInterrupt:  # at the prompt
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
