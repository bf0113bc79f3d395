"""Language-model evaluation: loss, perplexity and bits per byte over a token stream."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llmctl.artifacts import DatasetDir
from llmctl.errors import LlmctlError


@dataclass
class LMEvalResult:
    loss: float  # nats per predicted token
    perplexity: float
    bits_per_byte: float
    tokens: int  # tokens predicted
    bytes: int  # raw bytes those tokens decode to
    source: str
    unigram_perplexity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_tokens(
    model: Any,
    tokens: np.ndarray,
    byte_lengths: np.ndarray,
    *,
    source: str,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: str = "cpu",
    on_progress: Callable[[int, int], None] | None = None,
) -> LMEvalResult:
    """Score every token of `tokens` (but the first) once, in non-overlapping context windows."""
    import torch
    import torch.nn.functional as F

    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    n = len(tokens)
    if n < 2:
        raise LlmctlError(f"{source}: {n} tokens, too few to evaluate (need at least 2).")
    T = model.context_length
    starts = list(range(0, n - 1, T))
    nll, count, nbytes = 0.0, 0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(starts), batch_size):
            group = starts[i : i + batch_size]
            windows = [np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in group]
            for length in sorted({len(w) for w in windows}):
                same = [w for w in windows if len(w) == length]
                block = torch.from_numpy(np.stack(same)).to(device)  # (B, L+1)
                logits = model(block[:, :-1])  # (B, L, V)
                targets = block[:, 1:]
                nll += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="sum"))
                count += targets.numel()
                nbytes += int(byte_lengths[targets.cpu().numpy()].sum())
            if on_progress:
                on_progress(min(count, n - 1), n - 1)
    loss = nll / count
    bpb = nll / math.log(2) / nbytes if nbytes else float("nan")
    return LMEvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb, tokens=count, bytes=nbytes, source=source)


def dataset_of_model(provenance: dict[str, Any], model_dir: Path) -> DatasetDir:
    """The dataset dir a model was trained on, as recorded in its llmctl.json."""
    recorded = (provenance.get("dataset") or {}).get("dir")
    if not recorded:
        raise LlmctlError(
            f"{model_dir}/llmctl.json records no dataset dir; pass --data DATASET_DIR or --text FILE."
        )
    ds = DatasetDir(Path(recorded))
    if not ds.exists():
        raise LlmctlError(
            f"{recorded}: the dataset dir {model_dir} was trained on is gone; prepare it again, "
            "or pass --data DATASET_DIR or --text FILE."
        )
    return ds


def check_same_tokenizer(dataset: DatasetDir, model_tokenizer: Path) -> None:
    """Refuse scoring a dataset whose token ids come from another tokenizer."""
    import json

    def vocab(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LlmctlError(f"{path}: not a readable tokenizer.json.") from None

    if vocab(dataset.tokenizer) != vocab(model_tokenizer):
        raise LlmctlError(
            f"{dataset.path} was tokenized with another tokenizer than {model_tokenizer.parent}'s; "
            "its token ids would mean other text. Use --text FILE to evaluate on raw text instead."
        )


def encode_text_files(files: list[Path], tokenizer: Any, eot: int) -> np.ndarray:
    """Read text/JSONL/CSV files (UTF-8, strict) and encode them with the model's tokenizer."""
    from llmctl.config.schema import DataConfig
    from llmctl.data.shards import encode_texts
    from llmctl.data.sources import SourceStats, iter_documents
    from llmctl.data.tokenizer import token_dtype

    data = DataConfig(sources=[str(f) for f in files])
    texts, pending = [], ""
    for doc in iter_documents(data, SourceStats()):
        pending += doc.text
        if not doc.continues:
            texts.append(pending)
            pending = ""
    if pending:
        texts.append(pending)
    return encode_texts(tokenizer, texts, eot, token_dtype(tokenizer.get_vocab_size()))
