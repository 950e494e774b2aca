"""Parquet token shards in the reference layout: columns ``caption`` (string) and ``encoding`` (list of ints,
the VQGAN codes of one image). Reads stream batch by batch; the writer rolls over to a new shard every
``rows_per_shard`` rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA = pa.schema([("caption", pa.string()), ("encoding", pa.list_(pa.int32()))])


def shard_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    """A directory (all ``*.parquet`` in it, sorted), one file, or a list of files."""
    if isinstance(source, (str, Path)):
        p = Path(source)
        if p.is_dir():
            paths = sorted(p.glob("*.parquet"))
            if not paths:
                raise FileNotFoundError(f"no .parquet shards in {p}")
            return paths
        sources = [p]
    else:
        sources = [Path(s) for s in source]
    for s in sources:
        if not s.is_file():
            raise FileNotFoundError(f"parquet shard not found: {s}")
    return sources


def iter_token_shards(source: str | Path | Sequence[str | Path], *, batch_rows: int = 1024,
                      encoding_length: int | None = None,
                      extra_columns: Sequence[str] = ()) -> Iterator[dict[str, Any]]:
    """Stream rows ``{"caption": str, "encoding": int32 array, **extra}`` from the shards, in order.

    ``encoding_length``: if given, a row whose encoding has another length is an error (e.g. 256 codes).
    """
    for path in shard_paths(source):
        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        needed = ["caption", "encoding", *extra_columns]
        missing = [c for c in needed if c not in names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; has {sorted(names)}")
        for batch in pf.iter_batches(batch_size=batch_rows, columns=needed):
            cols = batch.to_pydict()
            for i, (caption, enc) in enumerate(zip(cols["caption"], cols["encoding"], strict=True)):
                codes = np.asarray(enc if enc is not None else [], dtype=np.int32)
                if encoding_length is not None and codes.shape != (encoding_length,):
                    raise ValueError(f"{path}: row encoding has {codes.size} codes, expected {encoding_length}")
                row = {"caption": caption if caption is not None else "", "encoding": codes}
                for c in extra_columns:
                    row[c] = cols[c][i]
                yield row


class TokenShardWriter:
    """Write (caption, encoding) rows into ``out_dir/{prefix}-00000.parquet``, ``…-00001``, … .

    Use as a context manager or call :meth:`close`; :attr:`paths` lists the shards written.
    """

    def __init__(self, out_dir: str | Path, *, rows_per_shard: int = 10_000, prefix: str = "shard"):
        if rows_per_shard <= 0:
            raise ValueError("rows_per_shard must be positive")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows_per_shard = rows_per_shard
        self.prefix = prefix
        self.paths: list[Path] = []
        self._captions: list[str] = []
        self._encodings: list[list[int]] = []
        self._closed = False

    def write(self, captions: Iterable[str], encodings: Iterable[Sequence[int]] | np.ndarray) -> None:
        """Append rows; ``encodings`` is (N, L) ints or N sequences of ints."""
        if self._closed:
            raise RuntimeError("TokenShardWriter is closed")
        caps = list(captions)
        encs = [np.asarray(e).astype(np.int64).tolist() for e in encodings]
        if len(caps) != len(encs):
            raise ValueError(f"{len(caps)} captions for {len(encs)} encodings")
        for c in caps:
            if not isinstance(c, str):
                raise TypeError(f"captions must be str, got {type(c).__name__}")
        for e in encs:
            if any(v < -(2**31) or v >= 2**31 for v in e):
                raise ValueError("encoding values must fit in int32")
        self._captions.extend(caps)
        self._encodings.extend(encs)
        while len(self._captions) >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, n: int) -> None:
        table = pa.table({"caption": self._captions[:n], "encoding": self._encodings[:n]}, schema=SCHEMA)
        path = self.out_dir / f"{self.prefix}-{len(self.paths):05d}.parquet"
        pq.write_table(table, path)
        self.paths.append(path)
        del self._captions[:n], self._encodings[:n]

    def close(self) -> list[Path]:
        if not self._closed:
            if self._captions:
                self._flush(len(self._captions))
            self._closed = True
        return self.paths

    def __enter__(self) -> TokenShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
