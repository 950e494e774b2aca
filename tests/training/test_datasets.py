"""Real-data readers: image+caption folders and parquet token shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from training.data.folders import center_crop_resize, iter_folder
from training.data.parquet import TokenShardWriter, iter_token_shards


def _img(path, w, h, colour):
    Image.new("RGB", (w, h), colour).save(path)


def test_folder_pairs(tmp_path):
    _img(tmp_path / "b.jpg", 40, 20, (255, 0, 0))
    (tmp_path / "b.txt").write_text("  a red thing \n")
    (tmp_path / "sub").mkdir()
    _img(tmp_path / "sub" / "a.png", 16, 16, (0, 0, 255))
    (tmp_path / "sub" / "a.txt").write_text("blue")
    _img(tmp_path / "c.png", 8, 8, (0, 255, 0))  # no caption
    (tmp_path / "d.jpg").write_bytes(b"not an image")
    (tmp_path / "d.txt").write_text("broken")
    items = list(iter_folder(tmp_path, image_size=8))
    assert [(i.key, i.caption) for i in items] == [("b", "a red thing"), ("sub/a", "blue")]
    assert items[0].image.shape == (8, 8, 3) and items[0].image.dtype == np.uint8
    assert items[1].image[4, 4].tolist() == [0, 0, 255]
    with_empty = {i.key: i.caption for i in iter_folder(tmp_path, missing_caption="empty")}
    assert with_empty["c"] == "" and with_empty["b"] == "a red thing"
    assert list(iter_folder(tmp_path))[0].image.shape == (20, 40, 3)  # no resize: native size
    with pytest.raises(FileNotFoundError, match="no caption"):
        list(iter_folder(tmp_path, missing_caption="error"))
    with pytest.raises(ValueError, match="cannot read image"):
        list(iter_folder(tmp_path, on_bad_image="error"))
    with pytest.raises(FileNotFoundError):
        list(iter_folder(tmp_path / "nope"))


def test_center_crop_resize_keeps_middle():
    im = Image.new("RGB", (30, 10), (255, 0, 0))
    im.paste((0, 255, 0), (10, 0, 20, 10))  # green middle third
    out = center_crop_resize(im, 10)
    assert out.shape == (10, 10, 3)
    assert out[5, 5].tolist() == [0, 255, 0]


def test_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    caps = [f"caption {i}" for i in range(25)]
    encs = rng.integers(0, 16384, size=(25, 16))
    with TokenShardWriter(tmp_path / "shards", rows_per_shard=10) as w:
        w.write(caps[:7], encs[:7])
        w.write(caps[7:], list(encs[7:]))
    assert [p.name for p in w.paths] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    rows = list(iter_token_shards(tmp_path / "shards", batch_rows=4, encoding_length=16))
    assert [r["caption"] for r in rows] == caps
    assert np.array_equal(np.stack([r["encoding"] for r in rows]), encs)
    assert rows[0]["encoding"].dtype == np.int32
    with pytest.raises(ValueError, match="expected 17"):
        next(iter_token_shards(tmp_path / "shards", encoding_length=17))
    with pytest.raises(RuntimeError):
        w.write(["x"], [[1]])


def test_parquet_reads_reference_layout_and_errors(tmp_path):
    # reference shards: int64 lists written by pandas/pyarrow, plus extra columns
    table = pa.table({"caption": ["a", "b"], "encoding": [[1, 2, 3], [4, 5, 6]], "clip_score": [0.3, 0.2]})
    pq.write_table(table, tmp_path / "ref.parquet")
    rows = list(iter_token_shards(tmp_path / "ref.parquet", extra_columns=("clip_score",)))
    assert rows[1]["encoding"].tolist() == [4, 5, 6] and rows[1]["clip_score"] == 0.2
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="missing column"):
        list(iter_token_shards(tmp_path / "bad.parquet"))
    with pytest.raises(FileNotFoundError):
        list(iter_token_shards(tmp_path / "empty_dir_missing"))
    w = TokenShardWriter(tmp_path / "o")
    with pytest.raises(ValueError, match="captions for"):
        w.write(["a", "b"], [[1]])
