"""Live-server helpers for the server tests: a tiny recursive model with a word-level
tokenizer and chat template, and uvicorn run on 127.0.0.1 in a thread."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import uvicorn
from conftest import tiny_llama_config, write_hf_model
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace

from model.build import convert_checkpoint
from model.config import LINEAR_MODULES
from server.app import create_app
from server.drain import DrainingServer
from server.loader import build_engine
from server.settings import ServeSettings

SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2: the tiny model's eos is 2
_WORD_TEXT = (
    "the a an and or but of to in on at for with from by is are was were be been it this that "
    "these those i you he she we they me him her us them my your his its our their what which "
    "who when where why how all any both each few more most other some such no not only own "
    "same so than too very can will just do have has hello world cat dog sun moon "
    "red blue green big small fast slow up down user assistant system . , ! ?"
)
WORDS = _WORD_TEXT.split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> "
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def write_tiny_tokenizer(directory: Path) -> None:
    """A word-level tokenizer whose ids all fit the tiny model's vocabulary of 101."""
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    assert len(vocab) <= tiny_llama_config().vocab_size
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "model_max_length": 128,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_tiny_rrt(root: Path) -> Path:
    """A random 6-layer Llama folded into 2 loops (rank 4), with the tiny tokenizer."""
    src, out = root / "hf", root / "rrt"
    src.mkdir()
    write_hf_model(src, tiny_llama_config())
    write_tiny_tokenizer(src)
    ranks = dict.fromkeys(LINEAR_MODULES, 4)
    convert_checkpoint(src, out, loops=2, init="average", ranks=ranks, evaluate=False)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``loopserve``'s app for ``settings`` under uvicorn in a thread, as ``serve`` runs it
    (with its connection guards; signals stay with the test process's main thread)."""

    def __init__(self, settings: ServeSettings) -> None:
        self.engine, self.tokenizer, self.info = build_engine(settings)
        self.app = create_app(self.engine, self.tokenizer, self.info, settings)
        self.port = free_port()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.server = DrainingServer(config, self.engine, settings.shutdown_grace)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)
