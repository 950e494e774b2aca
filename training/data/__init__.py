"""Datasets: the procedural captioned-shapes set, image+caption folders, parquet token shards."""

from training.data.captions import COLOURS, HELD_OUT_PAIRS, HELD_OUT_WRAPPERS, SHAPES, parse_prompt
from training.data.folders import FolderItem, iter_folder
from training.data.parquet import TokenShardWriter, iter_token_shards
from training.data.shapes import EvalPrompt, ShapeExample, ShapesConfig, ShapesDataset, eval_prompts, render_scene

__all__ = [
    "COLOURS", "HELD_OUT_PAIRS", "HELD_OUT_WRAPPERS", "SHAPES", "EvalPrompt", "FolderItem", "ShapeExample",
    "ShapesConfig", "ShapesDataset", "TokenShardWriter", "eval_prompts", "iter_folder", "iter_token_shards",
    "parse_prompt", "render_scene",
]
