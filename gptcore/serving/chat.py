"""`gptcore chat MODEL`: talk to an instruction-tuned model in the terminal.

    you> Return the sum of a and b.
    model> Return the sum of two numbers.        (streamed token by token)
    you> /temp 0.7                               sampling temperature (0 = greedy)
    you> /reset                                  forget the conversation
    you> ^D                                      quit

Each message is wrapped in the model's fine-tuning template (`Session.chat_ids`); earlier turns
stay in the context until they no longer fit in the block.
"""

from __future__ import annotations

import sys
from typing import TextIO

from gptcore.serving.session import Reply, Session

HELP = "commands: /reset (forget the conversation), /temp T (sampling temperature, 0 = greedy), /help; Ctrl-D quits"


def chat(session: Session, temperature: float = 0.7, max_new_tokens: int = 256, top_k: int | None = 200,
         seed: int | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None, **penalties) -> int:
    """Run the chat loop until end of input; returns the number of replies given. `penalties`:
    repetition_penalty, no_repeat_ngram_size (off by default)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()
    history: list[tuple[str, str]] = []
    replies = 0
    template = session.template or "none (raw continuation)"
    stdout.write(f"chatting with {session.name} (template {template}, temperature {temperature}). {HELP}\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:  # Ctrl-D / end of input
            stdout.write("\n")
            return replies
        message = line.rstrip("\n")
        if not interactive:
            stdout.write(message + "\n")  # echo piped input, so a transcript reads like a session
        if not message.strip():
            continue
        if message.startswith("/"):
            cmd, _, arg = message.partition(" ")
            if cmd == "/reset":
                history.clear()
                stdout.write("(conversation reset)\n")
            elif cmd == "/temp":
                try:
                    value = float(arg)
                    if value < 0:
                        raise ValueError
                    temperature = value
                    stdout.write(f"(temperature {temperature})\n")
                except ValueError:
                    stdout.write("(usage: /temp T with T >= 0, e.g. /temp 0.7)\n")
            else:
                stdout.write(f"({HELP})\n")
            continue
        reply = Reply()
        ids = session.chat_ids(history, message, room=min(max_new_tokens, session.block_size // 2))
        stdout.write("model> ")
        for piece in session.stream(ids, max_new_tokens, temperature, top_k, seed=seed, reply=reply, **penalties):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        history.append((message, reply.text))
        replies += 1
