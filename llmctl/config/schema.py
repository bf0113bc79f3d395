"""The recipe schema: the single source of truth for every setting's type, default, bound and help.

`llmctl recipes schema` prints it as JSON Schema, error messages quote its bounds,
and the shipped recipes' comments follow its descriptions. The `model` section is one typed config
per family and `data` one per task (llmctl/config/tagged.py); the model shapes' defaults are the
dataclasses' of llmctl/models/shapes.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from llmctl.config.tagged import TaggedSection, or_list
from llmctl.models.shapes import RECURRENT_FAMILIES, GPTClassifierConfig, GPTConfig, RNNConfig


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str | None = Field(
        None,
        description="Run name: the run dir is runs/<name>/ and the dataset dir defaults to data/<name>. "
        "Defaults to the recipe file's stem.",
    )
    seed: int = Field(0, ge=0, description="Seed for weight init, data order, dropout and sampling.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in {".", ".."}):
            raise ValueError("must be a plain name without '/', e.g. tiny-gpt")
        return v


class SourceSpec(_Section):
    """One input of `prepare`: a file, directory, glob, `builtin:stdlib` or `builtin:sentiment`."""

    path: str = Field(description="A file, directory, glob (data/**/*.txt), builtin:stdlib (this Python's standard "
                      "library) or builtin:sentiment (llmctl's generated labelled sentences).")
    format: Literal["auto", "text", "jsonl", "csv"] = Field(
        "auto", description="How to read it; auto goes by the extension (.jsonl/.json, .csv, else text)."
    )
    field: str = Field("text", description="The JSONL field or CSV column that holds the text.")


class LabelledSource(SourceSpec):
    """One labelled input of a classification dataset: a text and a label per row."""

    label_field: str = Field("label", description="The JSONL field or CSV column that holds the label.")


def _paths_as_sources(v: object) -> object:
    """A plain string (or a list of them) names a path: `a.txt` is `{path: a.txt}`."""
    if isinstance(v, (str, dict)):
        v = [v]
    if isinstance(v, list):
        return [{"path": s} if isinstance(s, str) else s for s in v]
    return v


class _DataSection(_Section):
    """What every task's dataset section holds; a task's section adds its own keys and says (class
    variables) what its runs report and which train settings apply to it."""

    # The eval figures this task's runs report, which train.monitor may follow.
    monitors: ClassVar[tuple[str, ...]] = ("val_loss",)
    weighs_classes: ClassVar[bool] = False  # train.class_weights as a list of weights applies
    trains_adapters: ClassVar[bool] = True  # train.lora applies (a language model)
    purpose: ClassVar[str]  # what its own keys are for, in "data.KEY <purpose>: it needs data.task: ..."

    task: str
    dir: str | None = Field(None, description="Dataset dir written by prepare; defaults to data/<run.name>.")
    sources: list[SourceSpec] = Field(
        default_factory=lambda: [SourceSpec(path="builtin:stdlib")],
        description="Inputs: paths, globs, directories, JSONL/CSV files, builtin:stdlib or builtin:sentiment. "
        "A plain string is a path; use {path, format, field} to name a JSONL field or CSV column.",
    )
    tokenizer: str | None = Field(
        None, description="Reuse this tokenizer.json instead of training one (vocab_size is then ignored)."
    )
    vocab_size: int = Field(4096, ge=260, le=1_000_000, description="BPE vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="A pair must occur this often to become a merge.")
    special_tokens: list[str] = Field(
        default_factory=lambda: ["<|endoftext|>"],
        description="Special tokens; the first one separates documents (end of text).",
    )
    val_fraction: float = Field(
        0.02, gt=0, lt=0.5, description="Share held out for validation: lm, documents chosen by a hash of each; "
        "classification, rows of every class (stratified, seeded by run.seed).",
    )
    encoding_errors: Literal["strict", "replace"] = Field(
        "strict", description="What to do with bytes that are not UTF-8 in your files: stop (strict) or replace."
    )
    max_bytes: int | None = Field(
        None, gt=0, description="Read at most this many bytes of text (for quick runs); null reads everything."
    )
    chunk_bytes: int = Field(
        1_000_000, ge=4096, description="Bytes of text encoded per parallel batch; bounds prepare's memory."
    )

    @field_validator("sources", mode="before")
    @classmethod
    def _strings_are_paths(cls, v: object) -> object:
        return _paths_as_sources(v)

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, v: list[SourceSpec]) -> list[SourceSpec]:
        if not v:
            raise ValueError("needs at least one source, e.g. [builtin:stdlib] or [data/*.txt]")
        return v

    @field_validator("special_tokens")
    @classmethod
    def _has_eot(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least the end-of-text token, e.g. ['<|endoftext|>']")
        if len(set(v)) != len(v):
            raise ValueError("has a repeated token")
        return v

    def source_lists(self) -> list[tuple[str, list[SourceSpec]]]:
        """The lists of inputs this section reads, each with its key: [("data.sources", [...])]."""
        return [("data.sources", list(self.sources))]

    def check_model(self, model: "_ModelSection") -> None:
        """Raise ValueError when `model` cannot read this task's data; every model reads it by default."""


class LMDataConfig(_DataSection):
    """Token shards of text for language modelling."""

    purpose: ClassVar[str] = "reads text for language modelling"
    task: Literal["lm"] = Field("lm", description="Chooses this section: token shards of text.")


class ClassificationDataConfig(_DataSection):
    """Labelled texts (CSV/JSONL rows with a text and a label) for sequence classification."""

    monitors: ClassVar[tuple[str, ...]] = ("val_loss", "val_accuracy", "val_f1")
    weighs_classes: ClassVar[bool] = True
    trains_adapters: ClassVar[bool] = False
    purpose: ClassVar[str] = "describes labelled texts"

    task: Literal["classification"] = Field("classification", description="Chooses this section: labelled texts.")
    sources: list[LabelledSource] = Field(
        default_factory=lambda: [LabelledSource(path="builtin:stdlib")],
        description="Labelled inputs: CSV/JSONL files, builtin:sentiment. A plain string is a path; use "
        "{path, format, field, label_field} to name the text and label columns.",
    )
    max_len: int = Field(
        128, ge=1, le=1_000_000, description="Tokens kept per text (longer ones are truncated, shorter padded).",
    )
    labels: list[str] | None = Field(
        None, description="The label set in class order (class 0, 1, ...); null: the train labels, sorted (numerically "
        "when all are integers).",
    )
    val_sources: list[LabelledSource] | None = Field(
        None, description="Labelled val files; null: a stratified val_fraction of sources is held out.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _labels_as_strings(cls, v: object) -> object:
        if isinstance(v, list):
            return [str(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else x for x in v]
        return v

    @field_validator("val_sources", mode="before")
    @classmethod
    def _val_strings_are_paths(cls, v: object) -> object:
        return None if v is None else _paths_as_sources(v)

    def source_lists(self) -> list[tuple[str, list[SourceSpec]]]:
        return [*super().source_lists(), ("data.val_sources", list(self.val_sources or []))]

    def check_model(self, model: "_ModelSection") -> None:
        if model.context_tokens is not None and self.max_len > model.context_tokens:
            raise ValueError(f"data.max_len ({self.max_len}) exceeds model.context_length ({model.context_tokens}): "
                             "the transformer classifier reads at most context_length tokens")


class InstructDataConfig(_DataSection):
    """Conversations rendered with a chat template, the loss on response tokens only."""

    purpose: ClassVar[str] = "renders instruction data"

    task: Literal["instruct"] = Field("instruct", description="Chooses this section: conversations.")
    chat_template: str | None = Field(
        None, description="A Jinja2 chat template (Hugging Face's format); null: the one of the model dir data.tokenizer "
        "comes from (model.init_from's), else llmctl's default. Stored in the model dir, so serve's chat endpoint uses it.",
    )


class DataConfig(TaggedSection):
    """The data section: one typed config per task, chosen by `data.task`."""

    tag = "task"
    default = "lm"
    tag_description = (
        "lm: token shards for language modelling; classification: labelled texts (CSV/JSONL with a text and a label "
        "column) for sequence classification; instruct: JSONL conversations (`messages`) or `prompt`/`response` pairs "
        "rendered with the chat template, the loss on response tokens only."
    )
    variants = {"lm": LMDataConfig, "classification": ClassificationDataConfig, "instruct": InstructDataConfig}


def _vocab_size_field() -> Any:
    return Field(None, ge=2, description="Vocabulary size; null takes it from the dataset's tokenizer.")


def _init_from_field() -> Any:
    return Field(
        None, description="Start from these weights: an llmctl model dir (its config.json must match this section), a local "
        "Hugging Face dir of a Llama, Mistral or Qwen2 model (config.json + safetensors + tokenizer.json: its shape and "
        "tokenizer are taken), or hf:ORG/NAME from the local Hugging Face cache (offline); null: random init.",
    )


def _pooling_field(when: str = "") -> Any:
    how = ("how per-token states become one vector: the last real token's state (both directions' final states when "
           "bidirectional), or the mean or max over real tokens.")
    return Field("last", description=f"{when}{how}" if when else how[0].upper() + how[1:])


class _ModelSection(_Section):
    """What every family's model section holds, and what the family's models are (class variables)."""

    serves: ClassVar[tuple[str, ...] | None] = None  # the data.task values it has a model for; None: every task
    kind: ClassVar[str]  # what its models are, in "model.family F is <kind>: it needs data.task: ..."
    purpose: ClassVar[str]  # what its own keys are for, in "model.KEY <purpose>: it needs model.family: ..."

    family: str

    @property
    def context_tokens(self) -> int | None:
        """The most tokens a model of this section reads at once; None: any number."""
        return None


class GPTModelConfig(_ModelSection):
    """A Llama-style decoder: the language model, or with data.task: classification a transformer classifier."""

    kind: ClassVar[str] = "a transformer"
    purpose: ClassVar[str] = "shapes the gpt decoder"

    family: Literal["gpt"] = Field("gpt", description="Chooses this section: the decoder.")
    n_layer: int = Field(GPTConfig.n_layer, ge=1, le=256, description="Transformer blocks.")
    n_head: int = Field(GPTConfig.n_head, ge=1, description="Attention (query) heads.")
    n_kv_head: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; null means n_head."
    )
    d_model: int = Field(GPTConfig.d_model, ge=8, description="Width of the residual stream.")
    head_dim: int | None = Field(
        None, ge=2, description="Width of one attention head; null means d_model / n_head (set by structured pruning)."
    )
    d_ff: int | None = Field(None, ge=1, description="SwiGLU hidden width; null means Llama's 8/3 d_model rounded up to 64.")
    context_length: int = Field(GPTConfig.context_length, ge=2, description="Tokens per sequence in training; the longest context.")
    dropout: float = Field(GPTConfig.dropout, ge=0, lt=1, description="Dropout on attention and residual outputs while training.")
    tie_embeddings: bool = Field(GPTConfig.tie_embeddings, description="Share the input embedding with the output head.")
    rope_theta: float = Field(GPTConfig.rope_theta, gt=0, description="Base of the rotary position embedding.")
    norm_eps: float = Field(GPTConfig.norm_eps, gt=0, description="Epsilon of RMSNorm.")
    init_std: float = Field(GPTConfig.init_std, gt=0, description="Standard deviation of the normal weight init.")
    vocab_size: int | None = _vocab_size_field()
    init_from: str | None = _init_from_field()
    attention_bias: bool = Field(GPTConfig.attention_bias, description="Biases on the q/k/v projections (Qwen2 has them).")
    pooling: Literal["last", "mean", "max"] = _pooling_field("With data.task: classification, ")

    @model_validator(mode="after")
    def _heads_divide(self) -> "GPTModelConfig":
        if self.head_dim is None and self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        head = self.head_dim or self.d_model // self.n_head
        if head % 2:
            raise ValueError(f"head size ({head}) must be even for rotary embeddings")
        kv = self.n_kv_head or self.n_head
        if self.n_head % kv:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({kv})")
        return self

    @property
    def context_tokens(self) -> int | None:
        return self.context_length

    def language_model_shape(self, vocab_size: int) -> GPTConfig:
        """The decoder language model this section describes, with `vocab_size` tokens."""
        return GPTConfig.from_dict({**self.model_dump(), "vocab_size": vocab_size})

    def classifier_shape(self, vocab_size: int, **head: Any) -> GPTClassifierConfig:
        """The decoder with a classification head (`head`: num_classes, pad_id, max_len, labels)."""
        return GPTClassifierConfig.from_dict({**self.model_dump(), "vocab_size": vocab_size, **head})


class RecurrentModelConfig(_ModelSection):
    """A recurrent classifier: embedding -> rnn, lstm or gru layers -> pooling -> a linear head."""

    serves: ClassVar[tuple[str, ...] | None] = ("classification",)
    kind: ClassVar[str] = "a classifier"
    purpose: ClassVar[str] = "shapes a recurrent classifier"

    family: Literal["rnn", "lstm", "gru"] = Field(description="Chooses this section: the cell, a tanh rnn, lstm or gru.")
    # 4, not RNNConfig's 1: recipes have always given every family the gpt's default depth.
    n_layer: int = Field(GPTConfig.n_layer, ge=1, le=256, description="Recurrent layers.")
    d_model: int = Field(RNNConfig.d_model, ge=8, description="Width of the token embedding.")
    hidden_size: int | None = Field(
        RNNConfig.hidden_size, ge=1, description="Units per recurrent layer (per direction); null means d_model.",
    )
    bidirectional: bool = Field(RNNConfig.bidirectional, description="Also read each text right to left.")
    pooling: Literal["last", "mean", "max"] = _pooling_field()
    dropout: float = Field(
        RNNConfig.dropout, ge=0, lt=1, description="Dropout on the embeddings, between layers and on the pooled vector.",
    )
    vocab_size: int | None = _vocab_size_field()
    init_from: str | None = _init_from_field()

    def classifier_shape(self, vocab_size: int, **head: Any) -> RNNConfig:
        """The recurrent classifier this section describes (`head`: num_classes, pad_id, max_len, labels)."""
        return RNNConfig.from_dict({**self.model_dump(), "vocab_size": vocab_size, **head})


class ModelConfig(TaggedSection):
    """The model section: one typed config per family, chosen by `model.family`."""

    tag = "family"
    default = "gpt"
    tag_description = (
        "Model family from the registry. gpt: Llama-style decoder (with data.task: classification, a transformer "
        "classifier on that backbone); rnn, lstm, gru: recurrent classifiers (classification only)."
    )
    variants = {"gpt": GPTModelConfig, **{family: RecurrentModelConfig for family in RECURRENT_FAMILIES}}


class LoraConfig(_Section):
    rank: int = Field(8, ge=1, description="Rank r of each adapter (A: r x in, B: out x r).")
    alpha: float = Field(16.0, gt=0, description="Scale: the adapter adds (alpha / rank) x B A x.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "v_proj"],
        description="Linear layers that get adapters, by name or name suffix (q_proj, k_proj, v_proj, o_proj, "
        "gate_proj, up_proj, down_proj); a target that matches no layer is an error.",
    )

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: list[str]) -> list[str]:
        if not v or not all(t.strip() for t in v):
            raise ValueError("needs at least one layer name, e.g. [q_proj, v_proj]")
        if len(set(v)) != len(v):
            raise ValueError("names a layer twice")
        return v


class TrainConfig(_Section):
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate.")
    batch_size: int = Field(16, ge=1, description="Sequences per optimizer step, over all processes.")
    micro_batch_size: int | Literal["auto"] | None = Field(
        None, description="Sequences per process per forward; null means batch_size / processes; auto picks the largest that "
        "fits the device's memory (or train.max_memory). Gradient accumulation steps = batch_size / "
        "(micro_batch_size x processes).",
    )
    max_memory: str | int | None = Field(
        None, description="Memory budget per device for micro_batch_size: auto, e.g. 8GiB; null uses what is free now.",
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp (a full model copy per device) or fsdp (sharded; needs GPUs).",
    )
    devices: list[int] | None = Field(
        None, description="GPU indices this run may use, e.g. [0, 2]; others are not touched. null uses all visible.",
    )
    skip_nonfinite: int = Field(
        0, ge=0, description="Skip up to this many steps whose loss or gradient is NaN/inf (logged); 0 stops at the first.",
    )
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop"] = Field("adamw", description="Optimizer.")
    momentum: float = Field(0.9, ge=0, lt=1, description="Momentum for sgd and rmsprop.")
    nesterov: bool = Field(False, description="Nesterov momentum for sgd.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam/AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="Adam/AdamW/RMSprop epsilon.")
    weight_decay: float = Field(0.1, ge=0, description="Weight decay (decoupled for adamw, L2 for the others); "
                                "not applied to norms.")
    l1: float = Field(0.0, ge=0, description="L1 penalty on weight matrices, added to the loss.")
    schedule: Literal["constant", "linear", "cosine"] = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup from 0 to lr over this many steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a share of lr, for linear and cosine.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm to this; 0 turns clipping off.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32, or bf16/fp16 autocast where the device supports it (fp16 needs a GPU)."
    )
    compile: bool = Field(False, description="Run the model through torch.compile (first step slower).")
    eval_every: int = Field(
        100, ge=1, description="Evaluate on the val split every N steps (and at the end); an N beyond the run's length "
        "(a recipe written for more data) is scaled to it, with a note: once an epoch for runs of 2+ epochs, else 5 times.",
    )
    eval_batches: int = Field(20, ge=1, description="Micro-batches of val data per process per evaluation.")
    log_every: int = Field(10, ge=1, description="Write a metrics.jsonl row every N steps.")
    checkpoint_every: int = Field(500, ge=1, description="Save a resumable checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the newest K step checkpoints; the best model is kept apart.")
    patience: int | None = Field(
        None, ge=1, description="Early stopping: stop after this many evaluations without improvement; null never stops early.",
    )
    min_delta: float = Field(0.0, ge=0, description="Early stopping: the least drop in val loss that counts as better.")
    keep_best: bool = Field(True, description="Write the model with the best val loss to model/ (else the last one).")
    keep_sparsity: bool = Field(
        False, description="Keep weights that start at zero at zero (recovery training of a pruned model)."
    )
    lora: LoraConfig | None = Field(
        None, description="Train low-rank adapters only ({rank, alpha, dropout, targets}); the base weights stay frozen. "
        "null: train all weights.",
    )
    epochs: float | None = Field(
        None, gt=0, description="Train this many passes over the train split instead of max_steps (max_steps = "
        "ceil(epochs x train examples / batch_size); for lm, examples are context_length windows).",
    )
    monitor: Literal["val_loss", "val_accuracy", "val_f1"] = Field(
        "val_loss", description="The eval figure that early stopping and keep_best follow (val_loss is minimised; "
        "val_accuracy and val_f1, macro-F1, need data.task: classification and are maximised).",
    )
    log_with: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers that also get the metrics.jsonl rows, through Accelerate: "
        "tensorboard, mlflow, wandb, one name or a list (each needs its own package; written under the run dir where the "
        "tracker allows).",
    )
    class_weights: Literal["none", "balanced"] | list[float] = Field(
        "none", description="With data.task: classification, the weight of each class in the loss: none, balanced "
        "(n / (classes x count)), or one weight per class in label order.",
    )

    @field_validator("log_with", mode="before")
    @classmethod
    def _one_tracker_is_a_list(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("max_memory")
    @classmethod
    def _memory_readable(cls, v: str | int | None) -> str | int | None:
        if v is not None:
            from llmctl.units import parse_memory

            try:
                parse_memory(v)
            except Exception as e:
                raise ValueError(getattr(e, "message", str(e))) from None
        return v

    @model_validator(mode="after")
    def _lora_fits(self) -> "TrainConfig":
        if self.lora is not None and self.keep_sparsity:
            raise ValueError("train.lora and train.keep_sparsity: merging the adapters would fill the zeros; choose one")
        if self.lora is not None and self.strategy == "fsdp":
            raise ValueError("train.lora works with train.strategy: ddp (FSDP flattens frozen and trained weights together)")
        return self

    @model_validator(mode="after")
    def _micro_divides(self) -> "TrainConfig":
        if self.micro_batch_size == "auto":
            return self
        mb = self.micro_batch_size or self.batch_size
        if mb > self.batch_size:
            raise ValueError(f"micro_batch_size ({mb}) cannot exceed batch_size ({self.batch_size})")
        if self.batch_size % mb:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({mb})")
        return self


class Distribution(_Section):
    """How `tune` samples one recipe key."""

    type: Literal["float", "int", "categorical"] = Field(description="float, int or categorical.")
    low: float | None = Field(None, description="Lowest value (float, int).")
    high: float | None = Field(None, description="Highest value (float, int).")
    log: bool = Field(False, description="Sample on a log scale (needs low > 0).")
    step: float | None = Field(None, gt=0, description="Spacing of the values (int: default 1; float: none).")
    choices: list[Any] | None = Field(None, description="The values of a categorical.")

    @model_validator(mode="after")
    def _consistent(self) -> "Distribution":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical needs a non-empty choices list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} needs low and high")
        if self.low > self.high:
            raise ValueError(f"low ({self.low:g}) is above high ({self.high:g})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got low {self.low:g}")
        if self.log and self.step is not None and self.type == "float":
            raise ValueError("a float cannot have both log and step")
        if self.type == "int" and (self.low != int(self.low) or self.high != int(self.high)):
            raise ValueError("an int needs integer low and high")
        return self


class TuneConfig(_Section):
    space: dict[str, Distribution] = Field(
        default_factory=dict, description="Dotted recipe key -> distribution, e.g. train.lr: {type: float, low: 1e-4, high: 1e-1, log: true}.",
    )
    objective: str = Field("val_loss", description="What each trial is scored on: a field of the eval rows of metrics.jsonl.")
    direction: Literal["minimize", "maximize"] = Field("minimize", description="Whether lower or higher objective is better.")
    trials: int = Field(20, ge=1, description="Trials in the study in all (a rerun continues up to this total).")
    timeout_s: float | None = Field(None, gt=0, description="Stop starting new trials after this many seconds; null: no limit.")
    max_steps: int | None = Field(None, ge=1, description="Training steps per trial; null keeps train.max_steps.")
    sampler: Literal["tpe", "random", "grid", "cmaes"] = Field("tpe", description="Optuna sampler.")
    startup_trials: int = Field(5, ge=0, description="Random trials before TPE/CMA-ES starts modelling.")
    pruner: Literal["median", "hyperband", "successive_halving", "none"] = Field(
        "median", description="Optuna pruner that stops unpromising trials at their evaluations."
    )
    pruner_startup_trials: int = Field(2, ge=0, description="Median pruner: trials to finish before any is pruned.")
    pruner_warmup_steps: int = Field(0, ge=0, description="Median pruner: do not prune a trial before this training step.")
    seed: int | None = Field(None, ge=0, description="Sampler seed; null uses run.seed.")
    nproc_per_trial: int = Field(
        1, ge=1, description="Processes per trial (llmctl train --nproc); rank 0 talks to Optuna and all ranks prune together.",
    )
    heartbeat_s: int = Field(10, ge=1, description="Workers' heartbeat; a trial silent for 3 heartbeats is failed and retried.")
    retries: int = Field(1, ge=0, description="How often a trial whose worker died is retried.")

    @field_validator("space", mode="before")
    @classmethod
    def _known_keys(cls, v: Any) -> Any:
        for key in v if isinstance(v, dict) else ():
            problem = unknown_recipe_key(key)
            if problem:
                raise ValueError(f"{key}: {problem}")
        return v


class CompressConfig(_Section):
    prune: float = Field(0.0, ge=0, lt=1, description="Share of weights (or heads and channels, if structured) to remove; 0: no pruning.")
    prune_method: Literal["global", "layer", "structured"] = Field(
        "global", description="global/layer: zero the smallest weights over all layers or per layer; structured: remove "
        "whole attention heads (KV groups) and MLP channels, giving a smaller dense model.",
    )
    recover_steps: int = Field(0, ge=0, description="Fine-tune this many steps after pruning, on the model's own dataset.")
    recover_lr: float | None = Field(None, gt=0, description="Learning rate of the recovery fine-tune; null: train.lr / 10.")
    quantize: Literal["none", "int8", "int8-weight", "int4-weight"] = Field(
        "none", description="int8: dynamic int8 linear layers (faster than fp32 on large matmuls, often slower on tiny models); "
        "int8-weight/int4-weight: weight-only.",
    )
    calibration_tokens: int = Field(8192, ge=128, description="Val tokens that score heads and channels for structured pruning.")
    eval_tokens: int | None = Field(
        65536, ge=2, description="Val tokens scored for perplexity before and after; null: the whole val split.",
    )


class ExportConfig(_Section):
    format: Literal["onnx", "hf"] = Field(
        "onnx", description="onnx: an ONNX graph with a KV cache; hf: a Hugging Face Llama dir (config.json, "
        "model.safetensors, tokenizer files) that transformers loads, verified against llmctl's logits.",
    )
    opset: int = Field(17, ge=17, description="ONNX opset (17 or newer).")
    atol: float = Field(1e-4, ge=0, description="Largest absolute difference from PyTorch allowed in the parity check.")
    quantize: Literal["none", "int8"] = Field("none", description="int8: also write model.int8.onnx (ONNX Runtime dynamic int8).")
    external_data_mb: float = Field(2048, gt=0, description="Weights above this size (MB) go to ONNX external data.")


class Recipe(_Section):
    """A whole recipe: one section per step."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=LMDataConfig)
    model: ModelConfig = Field(default_factory=GPTModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    compress: CompressConfig = Field(default_factory=CompressConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="before")
    @classmethod
    def _family_serves_task(cls, values: Any) -> Any:
        """A family without a model for the recipe's task is the one thing to say (before its keys are checked
        against the family: a gpt recipe turned to lstm would otherwise list every gpt key)."""
        if not isinstance(values, dict):
            return values
        model, data = values.get("model"), values.get("data")
        family = ModelConfig.tag_of(model) if isinstance(model, (dict, BaseModel)) else None
        task = DataConfig.tag_of(data) if isinstance(data, (dict, BaseModel)) or data is None else None
        section = ModelConfig.variants.get(family) if isinstance(family, str) else None
        if section is not None and task in DataConfig.variants and section.serves is not None and task not in section.serves:
            raise ValueError(f"model.family {family} is {section.kind}: it needs data.task: {or_list(list(section.serves))}")
        return values

    @model_validator(mode="after")
    def _sections_fit(self) -> "Recipe":
        """The train settings that only some tasks have, against what this recipe's task says it takes."""
        data, train = self.data, self.train
        if train.monitor not in data.monitors:
            raise ValueError(f"train.monitor {train.monitor} needs data.task: "
                             f"{DataConfig.tags_where(lambda v: train.monitor in v.monitors)} "
                             f"({data.task} runs have {', '.join(data.monitors)})")
        if isinstance(train.class_weights, list) and not data.weighs_classes:
            raise ValueError(f"train.class_weights needs data.task: {DataConfig.tags_where(lambda v: v.weighs_classes)}")
        if train.lora is not None and not data.trains_adapters:
            raise ValueError("train.lora adapts the gpt language model: it needs model.family: gpt and data.task: "
                             f"{DataConfig.tags_where(lambda v: v.trains_adapters)}")
        data.check_model(self.model)
        return self

    @property
    def name(self) -> str:
        assert self.run.name is not None, "load_recipe fills run.name"
        return self.run.name

    def data_dir(self) -> Path:
        return Path(self.data.dir) if self.data.dir else Path("data") / self.name


def unknown_recipe_key(dotted: str) -> str | None:
    """None when `dotted` (e.g. train.lr) names a recipe setting; else what is wrong, with a suggestion."""
    import difflib

    parts = dotted.split(".")
    if len(parts) not in (2, 3):
        return "expected section.key, e.g. train.lr (or section.key.field for a nested setting, e.g. train.lora.rank)"
    section = parts[0]
    sections = {name: f.annotation for name, f in Recipe.model_fields.items() if name != "tune"}
    if section not in sections:
        close = difflib.get_close_matches(section, list(sections), n=1)
        return f"unknown section {section!r}" + (f"; did you mean {close[0]}?" if close else "")
    model: Any = sections[section]
    for depth, name in enumerate(parts[1:], start=1):
        fields = list(model.model_fields)
        prefix = ".".join(parts[:depth])
        if name not in fields:
            close = [f for f in fields if name.startswith(f) or f.startswith(name)] or difflib.get_close_matches(name, fields, n=1, cutoff=0.5)
            return "unknown recipe key" + (f"; did you mean {prefix}.{close[0]}?" if close else "")
        if depth < len(parts) - 1:
            # A nested section such as train.lora (LoraConfig | None) may be set field by field.
            annotation = model.model_fields[name].annotation
            nested = [a for a in (annotation, *getattr(annotation, "__args__", ())) if isinstance(a, type) and issubclass(a, _Section)]
            if not nested:
                return f"{prefix}.{name} is a value, not a section"
            model = nested[0]
    return None
