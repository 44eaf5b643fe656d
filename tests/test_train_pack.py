"""The packed teacher rebuilds bit for bit, and a damaged part is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.pack_teacher import PackError, decode, encode, pack, unpack


def _q4_1(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Values as a Q4_1 dequantizer writes them: fp32(d16)·q + fp32(m16) per 32 values."""
    nb = rows * cols // 32
    d = rng.uniform(1e-3, 5e-2, nb).astype(np.float16).astype(np.float32)[:, None]
    m = rng.uniform(-0.5, 0.0, nb).astype(np.float16).astype(np.float32)[:, None]
    q = rng.integers(0, 16, (nb, 32)).astype(np.float32)
    q[:, 0], q[:, 1] = 0, 15  # the block's min and max, as the quantizer places them
    return (d * q + m).reshape(rows, cols)


def _q8_0(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    nb = rows * cols // 32
    d = rng.uniform(1e-4, 1e-2, nb).astype(np.float16).astype(np.float32)[:, None]
    q = rng.integers(-127, 128, (nb, 32)).astype(np.float32)
    q[:, 0] = 127
    return (d * q).reshape(rows, cols)


@pytest.mark.parametrize(
    ("make", "codec"),
    [(_q4_1, "q4_1"), (_q8_0, "q8_0"), (lambda r, a, b: r.normal(size=(a, b)), "raw")],
)
def test_encode_is_exact_and_small(make, codec: str) -> None:  # type: ignore[no-untyped-def]
    x = make(np.random.default_rng(0), 12, 64).astype(np.float32)
    got, pieces = encode(x)
    assert got == codec
    data = b"".join(pieces)
    assert len(data) <= {"q4_1": 20, "q8_0": 34, "raw": 128}[codec] * x.size // 32
    y = decode(got, data, list(x.shape), x.dtype.str)
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))


def test_pack_unpack_round_trip_and_checksums(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(1)
    src = tmp_path / "src"
    src.mkdir()
    tensors = {"a": _q4_1(rng, 8, 96), "b": _q8_0(rng, 4, 64), "norm": np.ones(7, np.float32)}
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text("{}")
    manifest = pack(src, tmp_path / "packed", part_mib=256 / 2**20)  # 256-byte parts
    assert len(manifest["parts"]) > 1
    unpack(tmp_path / "packed", tmp_path / "out")
    rebuilt = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert rebuilt == (src / "model.safetensors").read_bytes()
    part = tmp_path / "packed" / "part-01"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(PackError, match="part-01"):
        unpack(tmp_path / "packed", tmp_path / "out2")
