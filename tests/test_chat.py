"""nblib.chat: loading model folders (merged, adapter + base, and the clear errors), the scripted
conversation and its transcript, the terminal CLI through a pseudo-terminal, notebook 07."""
from __future__ import annotations

import os
import select
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from helpers import chat_tokenizer, run_on_model, save_chat_model
from transformers import GPT2Config, GPT2LMHeadModel

from nblib import chat, config, finetune
from nblib.dialogue import ASSISTANT, USER
from nblib.tokenizer import EOT, hf_tokenizer

REPO = Path(__file__).resolve().parents[1]
MERGED = "runs/finetune-lora-8bit/seed-1234/merged"
CLI = ["--model", MERGED, "--profile", "smoke", "--temperature", "0"]
START = "(64-token context: 32 for your message and the history, 32 for each answer); /help for commands"
# The CLI with a 0.3 s pause after each streamed piece, so that a test can type while an answer streams.
SLOW_CLI = "import sys, time; from nblib import chat; show = chat._print; " \
           "chat._print = lambda text: (show(text), time.sleep(0.3)); sys.exit(chat.main())"
# Ctrl-C must land while the answer streams: the first piece waits up to a minute (the Ctrl-C ends the
# wait), however late a loaded machine lets the test read it.
SLOWER_CLI = SLOW_CLI.replace("time.sleep(0.3)", "time.sleep(first.pop() if first else 0.3)").replace(
    "show = chat._print;", "show = chat._print; first = [60.0];")


@pytest.fixture
def merged(home, mirror) -> Path:
    """The run-on fixture model saved where 05_finetune_lora_8bit writes its merged model."""
    return save_chat_model(home / MERGED, chat_tokenizer(), run_on_model())


def smoke(**overrides) -> dict:
    return config.settings("chat", "smoke", **overrides)


def test_missing_model_names_the_notebook_that_makes_it(home):
    with pytest.raises(FileNotFoundError, match=r"no model folder at runs/finetune-lora-8bit/seed-1234/merged\. Run notebooks/05_finetune"):
        chat.load(MERGED)
    (home / "empty").mkdir()
    with pytest.raises(ValueError, match=r"neither config\.json .* nor adapter_config\.json"):
        chat.load("empty")


def test_model_without_role_tokens_is_refused(home, mirror):
    tok = hf_tokenizer()
    plain = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=1, n_head=2))
    save_chat_model(home / "runs/pretrain-mha/hf", tok, plain)
    with pytest.raises(ValueError, match=r"runs/pretrain-mha/hf: the tokenizer has no <\|user\|> token .*not a chat fine-tune"):
        chat.load("runs/pretrain-mha/hf")


def test_merged_model_loads_and_answers(merged):
    model, tok = chat.load(MERGED, device="cpu")
    assert not model.training and len(tok) == 50259
    reply = chat.session(model, tok, smoke(temperature=0)).ask("What is two plus two?")
    assert reply.text == "Two plus two is four."


def test_adapter_beside_a_missing_merged_folder_is_loaded_on_its_base(home, mirror):
    """A real peft adapter made with nblib.finetune's own pieces, saved the way its ``finish`` saves it."""
    torch.manual_seed(0)
    tok = hf_tokenizer()
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2))
    save_chat_model(home / "runs/pretrain-mha/hf", tok, base)
    model = finetune.load_base("runs/pretrain-mha/hf", "32bit")
    tok = finetune.load_tokenizer("runs/pretrain-mha/hf")
    ids = finetune.add_special_tokens(model, tok)
    cfg = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_targets": ["c_attn", "c_proj"]}
    peft_model = finetune.wrap_lora(model, cfg, ids, "32bit")
    with torch.no_grad():  # stand-in for training: move the LoRA factors and the marker rows off their init
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.peft_config["default"].base_model_name_or_path = "runs/pretrain-mha/hf"
    adapter = home / "runs/finetune-lora-8bit/seed-1234/adapter"
    peft_model.save_pretrained(adapter, save_embedding_layers=False)
    tok.save_pretrained(adapter)

    loaded, loaded_tok = chat.load(MERGED, device="cpu")  # merged/ is absent: adapter/ + its base
    x = torch.tensor([tok.encode(f"{USER} oi\n{ASSISTANT}")])
    peft_model.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, peft_model(x).logits, atol=1e-5)
    assert len(loaded_tok) == len(tok) and type(loaded).__name__ == "GPT2LMHeadModel"

    for f in (home / "runs/pretrain-mha/hf").iterdir():
        f.unlink()
    (home / "runs/pretrain-mha/hf").rmdir()
    with pytest.raises(FileNotFoundError, match=r"lora-8bit/seed-1234/adapter needs its base model 'runs/pretrain-mha/hf'"):
        chat.load(MERGED)


def test_scripted_conversation_and_transcript(merged, home, capsys):
    cfg = smoke(temperature=0, max_new_tokens=24)
    session = chat.session(*chat.load(MERGED, device="cpu"), cfg)
    script = ["What is two plus two?", "And three?", "/reset", "/bogus", "/rset", "/help", "<|user|>", "word " * 40,
              "Name a color.", "/exit", "never asked"]
    rows = chat.converse(session, script, echo=True)
    out = capsys.readouterr().out
    asked = [(r["conversation"], r["user"]) for r in rows]
    assert asked == [(1, "What is two plus two?"), (1, "And three?"), (2, "Name a color.")]
    assert "bot> Two plus two is four.\n" in out and "\nthe message is empty" in out
    assert "(unknown command /bogus: /help lists the commands)" in out
    assert "(unknown command /rset: did you mean /reset? /help lists the commands)" in out
    assert "\n  /reset  start a new conversation\n" in out and "settings: max_new_tokens=24, temperature=0," in out
    assert "\nthe message makes a 43-token prompt but only 40 tokens fit" in out  # not after a bot>
    assert "never asked" not in out
    for r in rows:
        assert USER not in r["assistant"] and ASSISTANT not in r["assistant"] and "<|" not in r["assistant"]
        assert f"bot> {r['assistant']}\n" in out  # what streamed is what was recorded
    path = chat.write_transcript(rows, MERGED, cfg)
    assert path == home / "reports" / "chat_transcript.md"
    text = path.read_text(encoding="utf-8")
    assert "## Conversation 2" in text and "**Assistant:** Two plus two is four." in text
    assert "- model: `runs/finetune-lora-8bit/seed-1234/merged`" in text and str(home) not in text
    assert all("<|" not in line for line in text.splitlines() if line.startswith("**Assistant:**"))


def test_ctrl_c_stops_one_answer_and_leaves_it_out_of_the_history(merged, monkeypatch, capsys):
    """An answer interrupted after its first piece: marked stopped, no row, no turn; the next line is
    answered as in a fresh conversation. Without ``interruptible`` (notebooks) the interrupt goes on up."""
    session = chat.session(*chat.load(MERGED, device="cpu"), smoke(temperature=0))
    show, pieces = chat._print, []

    def interrupt_second(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 2:
            raise KeyboardInterrupt
        show(text)

    monkeypatch.setattr(chat, "_print", interrupt_second)
    rows = chat.converse(session, ["What is two plus two?", "What is two plus two?"], interruptible=True)
    assert capsys.readouterr().out == "bot> Two (stopped)\nbot> Two plus two is four.\n"
    assert [r["user"] for r in rows] == ["What is two plus two?"]
    assert session.turns == [{"role": "user", "content": "What is two plus two?"},
                             {"role": "assistant", "content": "Two plus two is four."}]
    pieces.clear()
    with pytest.raises(KeyboardInterrupt):
        chat.converse(session, ["Name a color."])
    assert len(session.turns) == 2


def test_typed_spells_the_line_the_keys_make():
    assert chat.typed("Explain grv\x7f\x7fravity") == "Explain gravity"
    assert chat.typed("oops\x15Why\x1b[D\x1b[C?\x04\t") == "Why?"  # Ctrl-U, arrow keys, Ctrl-D, tab
    assert chat.typed("two\rlines\n") == "two lines "
    assert chat.typed("\x7fé") == "é"


def test_terminal_hides_keys_while_answering_and_keeps_them():
    termios = pytest.importorskip("termios")
    import pty

    master, slave = pty.openpty()
    try:
        saved = termios.tcgetattr(slave)
        terminal = chat.Terminal(slave)
        with terminal.answering():
            assert not termios.tcgetattr(slave)[3] & termios.ECHO
            os.write(master, "Explain grav\x7fvity é".encode())
            assert select.select([slave], [], [], 5)[0]  # the keys reached the terminal...
            assert not select.select([master], [], [], 0.2)[0]  # ...and nothing was echoed
        assert terminal.ahead == "Explain gravity é" and termios.tcgetattr(slave) == saved
        with pytest.raises(KeyboardInterrupt), terminal.answering():  # Ctrl-C while an answer streams
            raise KeyboardInterrupt
        assert termios.tcgetattr(slave) == saved and terminal.ahead == ""
    finally:
        os.close(master)
        os.close(slave)


def test_interact_falls_back_to_input_without_ipywidgets(merged, monkeypatch, capsys):
    session = chat.session(*chat.load(MERGED, device="cpu"), smoke(temperature=0))
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # as if it were not installed
    lines = iter(["What is two plus two?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert chat.interact(session) is None
    assert "bot> Two plus two is four." in capsys.readouterr().out


def test_interact_chat_box_answers_and_closes(merged, capsys):
    session = chat.session(*chat.load(MERGED, device="cpu"), smoke(temperature=0))
    _, box = chat.interact(session).children
    box.value = "What is two plus two?"  # what pressing Enter does
    assert box.value == "" and [t["content"] for t in session.turns] == ["What is two plus two?", "Two plus two is four."]
    box.value = "/exit"
    assert box.disabled
    assert "bot> Two plus two is four." in capsys.readouterr().out  # outside a kernel the Output widget passes prints through


def test_cli_missing_model_exits_with_the_reason(home, capsys):
    assert chat.main(["--model", "runs/nothing/merged", "--profile", "smoke"]) == 2
    assert "no model folder at runs/nothing/merged" in capsys.readouterr().err


def spawn(home: Path, *args: str) -> pexpect.spawn:
    """The chat CLI (``python *args``) in a pseudo-terminal, on the fixture model."""
    env = {**os.environ, "NBLIB_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    return pexpect.spawn(sys.executable, [*args, *CLI], env=env, cwd=str(REPO), encoding="utf-8", timeout=120)


def test_the_chat_says_what_the_model_is_before_it_speaks(merged, home):
    """Its fine-tune and base, parameters, pretraining tokens and profile; a smoke model's answers are said to be noise."""
    model, _ = chat.load(MERGED, device="cpu")
    params = sum(p.numel() for p in model.parameters())
    assert chat.about(model, merged) == f"{MERGED}: {params / 1e6:.1f}M parameters (no run summary beside it to say more)"
    base = home / "runs/pretrain-mha/seed-1337"
    base.mkdir(parents=True)
    (base / "summary.json").write_text('{"tokens_seen": 1234567}')
    for profile in ("smoke", "full"):
        (merged.parent / "summary.json").write_text(
            f'{{"label": "LoRA + 8-bit", "profile": "{profile}", "config": {{"base_model": "runs/pretrain-mha/seed-1337/hf"}}}}')
        (base / "hf").mkdir(exist_ok=True)
        line = chat.about(model, merged)
        assert line.startswith(f"LoRA + 8-bit of runs/pretrain-mha/seed-1337/hf ({params / 1e6:.1f}M parameters, pretrained "
                               f"on 1.2M tokens), {profile} profile")
        assert ("its answers are not expected to make sense" in line) is (profile == "smoke")
    cli = spawn(home, "-m", "nblib.chat")
    cli.expect_exact(f"model {MERGED}: {line}")
    cli.expect_exact(START)
    cli.sendline("/exit")
    cli.expect(pexpect.EOF)
    cli.close()
    rows = chat.converse(chat.session(model, chat_tokenizer(), smoke(temperature=0)), ["Name a color."])
    text = chat.write_transcript(rows, MERGED, smoke(), described=line).read_text(encoding="utf-8")
    assert f"- model: `{MERGED}`: {line}" in text


def test_cli_commands_refusals_and_turns_in_a_pty(merged, home):
    cli = spawn(home, "-m", "nblib.chat")
    cli.expect_exact(START)
    cli.expect_exact("you> ")
    cli.sendline("/help")
    cli.expect_exact("commands:\r\n  /help   list the commands and the generation settings\r\n"
                     "  /reset  start a new conversation\r\n  /exit   leave (Ctrl-D too)\r\n"
                     "settings: max_new_tokens=32, temperature=0.0, top_k=50")
    cli.expect_exact("you> ")
    cli.sendline("/rest")
    cli.expect_exact("(unknown command /rest: did you mean /reset? /help lists the commands)")
    cli.expect_exact("you> ")
    cli.sendline("What is two plus two?")
    cli.expect_exact("bot> Two plus two is four.\r\nyou> ")  # no blank line: the answer's newline is not shown
    cli.sendline("word " * 40)
    cli.expect_exact("\r\nthe message makes a 43-token prompt but only 32 tokens fit: the model's context is 64 tokens")
    cli.expect_exact("lower max_new_tokens (--max-new-tokens) to 21 or use a model with a longer context, such as the "
                     "full profile's fine-tune of gpt2")
    cli.expect_exact("you> ")  # the chat goes on
    cli.sendline("Name a color.")
    cli.expect(r"bot> ([^\r\n]+)\r\n")
    second = cli.match.group(1)
    assert second and "<|" not in second
    cli.expect_exact("you> ")
    cli.sendline("/reset")
    cli.expect_exact("(conversation 2)")
    cli.expect_exact("you> ")
    cli.sendline("/exit")
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0


def test_cli_keys_typed_while_an_answer_streams_start_the_next_line(merged, home):
    cli = spawn(home, "-c", SLOW_CLI)
    cli.expect_exact("you> ")
    cli.sendline("What is two plus two?")
    cli.expect_exact("bot> Two")
    cli.send("Name a colr\x7f\x7flor.")  # typed (with a correction) while " plus two is four." streams
    cli.expect_exact("\r\n")
    assert cli.before == " plus two is four."  # not echoed into the answer
    cli.expect_exact("you> Name a color.")  # but waiting on the next line, ready to edit or send
    cli.send("\r")
    cli.expect_exact("\r\nbot> ")  # sent as typed
    cli.send("/hepl\x7f\x7flp")
    cli.expect_exact("\r\nyou> /help")
    cli.send("\r")
    cli.expect_exact("\r\ncommands:\r\n")  # the line sent is the one shown
    cli.expect_exact("you> ")
    cli.sendline("/exit")
    cli.expect(pexpect.EOF)
    cli.close()
    assert cli.exitstatus == 0


def test_cli_ctrl_c_stops_the_answer_and_at_an_empty_prompt_leaves(merged, home):
    cli = spawn(home, "-c", SLOWER_CLI)
    cli.expect_exact("you> ")
    cli.sendline("What is two plus two?")
    cli.expect_exact("bot> Two")
    cli.sendintr()  # Ctrl-C while " plus two is four." streams
    cli.expect_exact(" (stopped)\r\nyou> ")  # the chat goes on
    cli.sendline("What is two plus two?")
    cli.expect_exact("bot> Two plus two is four.\r\nyou> ")
    cli.sendintr()  # Ctrl-C at the prompt leaves, as before
    cli.expect(pexpect.EOF)
    assert "Traceback" not in cli.before
    cli.close()
    assert cli.exitstatus == 0


def test_notebook_07_writes_the_transcript(merged, home, tmp_path):
    import papermill

    out = tmp_path / "07.ipynb"
    papermill.execute_notebook(str(REPO / "notebooks/07_chat_demo.ipynb"), str(out), kernel_name="python3",
                               parameters={"profile": "smoke", "temperature": 0.0}, progress_bar=False,
                               cwd=str(REPO / "notebooks"))
    text = (home / "reports" / "chat_transcript.md").read_text(encoding="utf-8")
    assert "**User:** What is photosynthesis?" in text and "## Conversation 2" in text
    assert str(home) not in out.read_text(encoding="utf-8")  # no machine paths in the outputs


def test_transcript_escapes_html_from_users_and_models(home):
    rows = [{"conversation": 1, "user": "<b>hi</b>", "assistant": "<script>alert(1)</script>\nok", "stopped_on": EOT,
             "truncated": False, "new_tokens": 1, "tokens_per_s": 3.0, "dropped_turns": 0}]
    text = chat.transcript(rows, "runs/x/merged", smoke())
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;  \nok" in text
    assert "**User:** &lt;b&gt;hi&lt;/b&gt;" in text and "1 token at 3.0 tokens/s" in text


def test_an_empty_answer_is_said_in_the_terminal_as_in_the_transcript(home, mirror, capsys):
    """A model that always says end-of-text first: the terminal shows what the transcript shows."""
    tok = chat_tokenizer()
    mute = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    with torch.no_grad():  # the final layer norm outputs e_0, and only end-of-text's (tied) embedding points there
        mute.transformer.ln_f.weight.zero_()
        mute.transformer.ln_f.bias.copy_(torch.eye(16)[0])
        mute.transformer.wte.weight[:, 0] = 0.0
        mute.transformer.wte.weight[tok.convert_tokens_to_ids(EOT), 0] = 10.0
    save_chat_model(home / "mute", tok, mute)
    cfg = smoke(model="mute", temperature=0)
    rows = chat.converse(chat.session(*chat.load("mute", device="cpu"), cfg), ["Hello?"])
    assert rows[0]["assistant"] == "" and capsys.readouterr().out == "bot> (empty answer)\n"
    assert "**Assistant:** *(empty answer)*" in chat.write_transcript(rows, "mute", cfg).read_text(encoding="utf-8")


def _cli(home: Path, *args: str) -> tuple[int, str]:
    import subprocess

    env = {**os.environ, "NBLIB_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "nblib.chat", "--profile", "smoke", "--device", "cpu", *args],
                          env=env, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    return proc.returncode, proc.stderr


def test_cli_broken_model_folders_and_bad_numbers_are_one_line_each(home, mirror, tmp_path):
    tok = chat_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=16, n_layer=1, n_head=2))
    for name in ("noweights", "badconfig", "badweights"):
        save_chat_model(home / name, tok, model)
    (home / "noweights" / "model.safetensors").unlink()
    (home / "badconfig" / "config.json").write_text("{", encoding="utf-8")
    (home / "badweights" / "model.safetensors").write_bytes(b"garbage")
    cases = [
        (["--model", "noweights"], "chat: noweights is not a loadable merged model: Error no file named model.safetensors"),
        (["--model", "badconfig"], "chat: badconfig is not a loadable merged model: It looks like the config file at"),
        (["--model", "badweights"], "chat: badweights/model.safetensors cannot be read (SafetensorError: Error while "
                                    "deserializing header"),
        (["--temperature", "-1"], "python -m nblib.chat: error: invalid chat setting(s): temperature=-1.0 must be a number >= 0"),
        (["--top-k", "0"], "python -m nblib.chat: error: invalid chat setting(s): top_k=0 must be an integer >= 1, or null"),
        (["--top-k", "x"], "python -m nblib.chat: error: argument --top-k: invalid int value: 'x'"),
    ]
    for args, message in cases:
        code, err = _cli(home, *args)
        assert code == 2 and "Traceback" not in err and message in err.splitlines()[-1], (args, err[-1500:])
