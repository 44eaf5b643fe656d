"""Pack the teacher into parts small enough to carry to a GPU machine; rebuild it there exactly.

    python -m benchmarks.pack_teacher pack [SRC_DIR] [.gpu/teacher] [--part-mib 48]
    python -m benchmarks.pack_teacher unpack .gpu/teacher OUT_DIR

The teacher is SmolLM2-135M-Instruct *dequantized from Q4_1* (DESIGN.md §4): its fp32
safetensors (538 MB) holds, per 32-value block, only 16 distinct values ``d·q + m`` (Q4_1; d, m
fp16) or ``d·q`` (Q8_0, the embedding; q int8). ``pack`` recovers d, m and q for every block,
checks that they rebuild the block bit for bit, and falls back to the raw bytes for any tensor
where one block does not; the packed weights (~97 MB) are split into ``part-NN`` files of at
most ``--part-mib`` MiB, next to ``manifest.json`` (every part's and every tensor's SHA-256, and
the source file's) and the small files (config, tokenizer). ``unpack`` checks every part,
rebuilds every tensor, checks each one's SHA-256, writes ``model.safetensors`` and checks that
file's SHA-256 against the source's: the rebuilt directory is the teacher, byte for byte.
Needs torch, numpy and safetensors only (no network, no gguf package).

The output folder ``.gpu/`` is git-ignored: it travels to the device machine through a run's
``carry`` (64 MiB a call), one part per call — see benchmarks/uptrain_recipe.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

SMALL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
BLOCK = 32


class PackError(RuntimeError):
    """A part or a rebuilt tensor does not match its checksum."""


def _sha(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _fp16_candidates(x: np.ndarray) -> list[np.ndarray]:
    """fp16 values at and one ulp either side of ``x`` (fp32 rounding may miss the stored
    scale by one ulp)."""
    h = x.astype(np.float16)
    up = np.nextafter(h, np.float16(np.inf)).astype(np.float16)
    down = np.nextafter(h, np.float16(-np.inf)).astype(np.float16)
    return [h, up, down]


def _fit(
    blocks: np.ndarray, offset: np.ndarray, scale_base: np.ndarray, qmax: int, qmin: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """fp16 scales d [nb] and integer codes [nb, 32] with fp32(d)·q + offset == blocks
    exactly (the dequantizer's arithmetic); None when some block has no such d."""
    d_best = np.zeros(len(blocks), np.float16)
    q_best = np.zeros(blocks.shape, np.int16)
    done = np.zeros(len(blocks), bool)
    for d16 in _fp16_candidates(scale_base):
        d = d16.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(d != 0, np.rint((blocks - offset) / d), 0)
        q = np.clip(q, qmin, qmax).astype(np.int16)
        recon = d * q.astype(np.float32) + offset
        ok = ~done & np.all(recon.view(np.uint32) == blocks.view(np.uint32), axis=1)
        d_best[ok], q_best[ok] = d16[ok], q[ok]
        done |= ok
    return (d_best, q_best) if done.all() else None


def encode(x: np.ndarray) -> tuple[str, list[bytes]]:
    """The smallest exact encoding of an fp32 tensor: q4_1, q8_0 or raw."""
    if x.dtype != np.float32 or x.size % BLOCK or x.size < BLOCK:
        return "raw", [x.tobytes()]
    blocks = x.reshape(-1, BLOCK)
    m = blocks.min(axis=1)
    if np.array_equal(m.astype(np.float16).astype(np.float32), m):
        fit = _fit(blocks, m[:, None], (blocks.max(axis=1) - m) / 15, 15, 0)
        if fit is not None:
            d16, q = fit
            q8 = q.astype(np.uint8)
            nibbles = q8[:, 0::2] | (q8[:, 1::2] << 4)  # [nb, 16]
            return "q4_1", [d16.tobytes(), m.astype(np.float16).tobytes(), nibbles.tobytes()]
    zero = np.zeros((len(blocks), 1), np.float32)
    fit = _fit(blocks, zero, np.abs(blocks).max(axis=1) / 127, 127, -127)
    if fit is not None:
        d16, q = fit
        return "q8_0", [d16.tobytes(), q.astype(np.int8).tobytes()]
    return "raw", [x.tobytes()]


def decode(codec: str, data: bytes, shape: list[int], dtype: str) -> np.ndarray:
    """Inverse of ``encode``, with the dequantizer's fp32 arithmetic."""
    if codec == "raw":
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
    nb = int(np.prod(shape)) // BLOCK
    d = np.frombuffer(data[: 2 * nb], np.float16).astype(np.float32)[:, None]
    if codec == "q4_1":
        m = np.frombuffer(data[2 * nb : 4 * nb], np.float16).astype(np.float32)[:, None]
        nib = np.frombuffer(data[4 * nb :], np.uint8).reshape(nb, BLOCK // 2)
        q = np.empty((nb, BLOCK), np.uint8)
        q[:, 0::2], q[:, 1::2] = nib & 0xF, nib >> 4
        return (d * q.astype(np.float32) + m).reshape(shape)
    q = np.frombuffer(data[2 * nb :], np.int8).reshape(nb, BLOCK)
    return (d * q.astype(np.float32)).reshape(shape)


def pack(src: Path, out: Path, part_mib: float) -> dict[str, Any]:
    from safetensors.numpy import load_file

    weights = src / "model.safetensors"
    tensors = load_file(str(weights))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*"):
        old.unlink()
    blob = bytearray()
    index = []
    counts: dict[str, int] = {}
    for name, x in tensors.items():
        codec, pieces = encode(x)
        data = b"".join(pieces)
        index.append(
            {
                "name": name,
                "shape": list(x.shape),
                "dtype": x.dtype.str,
                "codec": codec,
                "offset": len(blob),
                "length": len(data),
                "sha256": _sha(np.ascontiguousarray(x).tobytes()),
            }
        )
        blob += data
        counts[codec] = counts.get(codec, 0) + int(x.size)
    limit = int(part_mib * 2**20)
    parts = []
    for i, start in enumerate(range(0, len(blob), limit)):
        piece = memoryview(blob)[start : start + limit]
        path = out / f"part-{i:02d}"
        path.write_bytes(piece)
        parts.append({"file": path.name, "bytes": len(piece), "sha256": _sha(piece)})
    small = [n for n in SMALL_FILES if (src / n).exists()]
    for n in small:
        shutil.copy(src / n, out / n)
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        metadata = f.metadata()
    manifest = {
        "format": 1,
        "source": str(src),
        "safetensors_sha256": _file_sha(weights),
        "safetensors_bytes": weights.stat().st_size,
        "metadata": metadata,
        "parts": parts,
        "tensors": index,
        "small_files": {n: _file_sha(out / n) for n in small},
        "values_by_codec": counts,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def unpack(packed: Path, out: Path) -> Path:
    from safetensors.numpy import save_file

    manifest = json.loads((packed / "manifest.json").read_text())
    blob = bytearray()
    for part in manifest["parts"]:
        path = packed / part["file"]
        if not path.exists():
            raise PackError(f"{path} is missing (carry every part, see uptrain_recipe.md)")
        data = path.read_bytes()
        if _sha(data) != part["sha256"]:
            raise PackError(f"{path}: SHA-256 mismatch (a truncated or stale part)")
        blob += data
    tensors = {}
    for t in manifest["tensors"]:
        data = bytes(blob[t["offset"] : t["offset"] + t["length"]])
        x = decode(t["codec"], data, t["shape"], t["dtype"])
        if _sha(x.tobytes()) != t["sha256"]:
            raise PackError(f"tensor {t['name']} rebuilt with a different SHA-256")
        tensors[t["name"]] = x
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "model.safetensors"
    save_file(tensors, str(weights), metadata=manifest["metadata"])
    for name, sha in manifest["small_files"].items():
        shutil.copy(packed / name, out / name)
        if _file_sha(out / name) != sha:
            raise PackError(f"{name}: SHA-256 mismatch")
    if _file_sha(weights) != manifest["safetensors_sha256"]:
        # Every tensor matched: only the container bytes (header order) could differ.
        print(f"note: {weights} holds the same tensors, but its header differs from the source")
    else:
        print(f"{weights}: SHA-256 equals the source file's ({manifest['safetensors_sha256']})")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.pack_teacher", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    pk = sub.add_parser("pack", help="write the packed parts and manifest")
    pk.add_argument("src", nargs="?", type=Path, default=None, help="default: pulled SmolLM2")
    pk.add_argument("out", nargs="?", type=Path, default=Path(".gpu/teacher"))
    pk.add_argument("--part-mib", type=float, default=48.0)
    up = sub.add_parser("unpack", help="rebuild the teacher directory, checking every checksum")
    up.add_argument("packed", type=Path)
    up.add_argument("out", type=Path)
    args = p.parse_args(argv)
    if args.command == "unpack":
        try:
            unpack(args.packed, args.out)
        except PackError as e:
            print(f"pack_teacher: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.src is None:
        from model.pull import source_model_dir

        args.src = source_model_dir()
    m = pack(args.src, args.out, args.part_mib)
    total = sum(part["bytes"] for part in m["parts"])
    print(f"packed {m['safetensors_bytes'] / 2**20:.0f} MiB into {total / 2**20:.1f} MiB:")
    for part in m["parts"]:
        print(f"  {args.out / part['file']}  {part['bytes'] / 2**20:.1f} MiB")
    print(f"  values by codec: {m['values_by_codec']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
