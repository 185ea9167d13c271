"""posttrain.data: dataset formats, tokenizers and chat templates, tokenization with loss
masks, batching and packing, and synthetic tasks. Everything reads local files only."""
from posttrain.data.collate import IGNORE_INDEX, Batch, collate
from posttrain.data.formats import (
    ChatRecord,
    DataError,
    LoadResult,
    Message,
    PreferenceRecord,
    PromptCompletionRecord,
    Record,
    RLRecord,
    load_records,
    scan_file,
    validate_file,
)
from posttrain.data.packing import PackedRow, block_causal_mask, collate_packed, pack
from posttrain.data.tasks import TASKS, Task, write_task
from posttrain.data.tokenize import (
    EncodeStats,
    Example,
    encode_preference,
    encode_prompt,
    encode_sft,
    encode_sft_dataset,
)
from posttrain.data.tokenizer import (
    SPECIAL_TOKENS, TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer, token_ids,
)
from posttrain.data.config import DataConfig, MixSource

__all__ = [
    "IGNORE_INDEX", "Batch", "collate",
    "ChatRecord", "DataError", "LoadResult", "Message", "PreferenceRecord", "PromptCompletionRecord",
    "Record", "RLRecord", "load_records", "scan_file", "validate_file",
    "PackedRow", "block_causal_mask", "collate_packed", "pack",
    "TASKS", "Task", "write_task",
    "EncodeStats", "Example", "encode_preference", "encode_prompt", "encode_sft", "encode_sft_dataset",
    "SPECIAL_TOKENS", "TokenizerConfig", "build_tokenizer", "load_tokenizer", "save_tokenizer", "token_ids",
    "DataConfig", "MixSource",
]
