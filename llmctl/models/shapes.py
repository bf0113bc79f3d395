"""The shapes of llmctl's model families as plain dataclasses, free of torch.

A shape is what a model dir's config.json and a recipe's model section describe: `GPTConfig` for the
`gpt` decoder, `GPTClassifierConfig` for that decoder with a classification head, `RNNConfig` for the
recurrent classifiers. The defaults and derived sizes (Llama's d_ff rule, the head size, the parameter
count) are written here once: the recipe schema takes its defaults from these classes, the models are
built from them and the memory planner reads the same object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

RECURRENT_FAMILIES = ("rnn", "lstm", "gru")  # tanh RNN, LSTM and GRU cells
POOLINGS = ("last", "mean", "max")


@dataclass
class GPTConfig:
    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 128
    head_dim: int | None = None
    d_ff: int | None = None
    context_length: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    attention_bias: bool = False  # biases on q_proj, k_proj and v_proj (Qwen2); o_proj never has one

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = llama_d_ff(self.d_model)

    @property
    def head_size(self) -> int:
        """Width of one attention head: `head_dim` when set (a structurally pruned model), else d_model / n_head."""
        return self.head_dim or self.d_model // self.n_head

    @property
    def d_kv(self) -> int:
        """Width of the keys (and of the values): n_kv_head heads."""
        return self.n_kv_head * self.head_size

    @property
    def layer_matrices(self) -> int:
        """Weights of one block's linear layers: q, o (d x d_q), k, v (d x d_kv), gate, up, down (d x d_ff)."""
        d = self.d_model
        return 2 * d * self.n_head * self.head_size + 2 * d * self.d_kv + 3 * d * self.d_ff

    @property
    def layer_parameters(self) -> int:
        """One block's parameters: its matrices, q/k/v biases when it has them, two RMSNorm weights."""
        biases = self.n_head * self.head_size + 2 * self.d_kv if self.attention_bias else 0
        return self.layer_matrices + biases + 2 * self.d_model

    @property
    def parameters(self) -> int:
        """Unique parameters of the language model; a tied output head shares the embedding and is counted once."""
        embedding = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else embedding
        return embedding + head + self.n_layer * self.layer_parameters + self.d_model

    @property
    def largest_tensor(self) -> int:
        """Elements of the largest weight: the embedding or an MLP matrix."""
        return max(self.vocab_size * self.d_model, self.d_model * self.d_ff)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "GPTConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return {"family": "gpt", **asdict(self)}


def llama_d_ff(d_model: int) -> int:
    """Llama's SwiGLU width: 2/3 of 4 d_model, rounded up to a multiple of 64."""
    return 64 * math.ceil(int(8 * d_model / 3) / 64)


def check_head(num_classes: int, pooling: str) -> None:
    """Refuse a classification head of fewer than two classes or an unknown pooling (ValueError)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


@dataclass
class GPTClassifierConfig(GPTConfig):
    num_classes: int = 2
    pad_id: int = 0  # recorded for callers; causal attention keeps right padding out of real positions
    pooling: str = "last"
    labels: list[str] | None = None
    max_len: int | None = None  # tokens per text the model was trained on (data.max_len); callers truncate to it

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head(self.num_classes, self.pooling)


@dataclass
class RNNConfig:
    family: str  # rnn (tanh), lstm or gru
    vocab_size: int
    num_classes: int
    pad_id: int = 0  # the id that fills rows past their length; recorded for callers, never read by the model
    n_layer: int = 1
    d_model: int = 128  # embedding width
    hidden_size: int | None = None  # units per layer per direction; None means d_model
    bidirectional: bool = False
    pooling: str = "last"
    dropout: float = 0.0  # on the embeddings, between recurrent layers, and on the pooled vector
    labels: list[str] | None = None  # class names in class order, when the caller records them
    max_len: int | None = None  # tokens per text the model was trained on (data.max_len); callers truncate to it

    def __post_init__(self) -> None:
        if self.family not in RECURRENT_FAMILIES:
            raise ValueError(f"family must be one of {', '.join(RECURRENT_FAMILIES)}, got {self.family!r}")
        check_head(self.num_classes, self.pooling)
        if self.hidden_size is None:
            self.hidden_size = self.d_model

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> "RNNConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gpt_shape(config: GPTConfig | Mapping[str, Any], purpose: str = "count parameters") -> GPTConfig:
    """`config` as a GPTConfig: itself, or a config.json-style dict read with GPTConfig's defaults.

    Raises LlmctlError for a dict of another family or without a vocab_size (`purpose` says what needed it).
    """
    if isinstance(config, GPTConfig):
        return config
    from llmctl.errors import LlmctlError

    family = config.get("family", "gpt")
    if family != "gpt":
        raise LlmctlError(f"model.family: {purpose} knows the gpt family only, got {family!r}.")
    if not config.get("vocab_size"):
        raise LlmctlError(f"model.vocab_size: needed to {purpose}; take it from the dataset's tokenizer first.")
    return GPTConfig.from_dict(config)


def count_parameters(config: GPTConfig | Mapping[str, Any]) -> int:
    """Unique parameters of the `gpt` language model `config` describes (a shape or its config.json), without building it."""
    return gpt_shape(config).parameters
