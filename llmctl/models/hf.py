"""Hugging Face checkpoints of the Llama family <-> llmctl's `gpt` family.

`gpt` is the Llama architecture under HF's parameter names, so a checkpoint maps through its
config alone. This module reads a Llama, Mistral or Qwen2 `config.json` into the recipe's model
section, refusing by name every field whose value `gpt` cannot reproduce; checks and reads
safetensors weights (one file or sharded) against that config; finds a checkpoint in the local
Hugging Face cache (`hf:ORG/NAME`, offline); and, the other way, writes the config and tokenizer
files transformers reads. It imports neither torch nor transformers at module level: the recipe
loader calls it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from llmctl.artifacts import HFModelDir
from llmctl.errors import LlmctlError

HF_PREFIX = "hf:"

# model_type -> the architecture class transformers builds for it; all three are Llama's layout.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# The recipe's model-section keys an HF checkpoint decides (its weights' shapes and its maths).
SHAPE_KEYS = (
    "n_layer", "n_head", "n_kv_head", "d_model", "head_dim", "d_ff", "vocab_size", "tie_embeddings",
    "rope_theta", "norm_eps", "attention_bias",
)

# config.json entries that say nothing about the forward pass: PretrainedConfig's own attributes
# (transformers 4.x wrote them all out, generation settings included), token ids, dtypes.
_GENERIC_KEYS = frozenset("""
    _name_or_path architectures model_type transformers_version torch_dtype dtype use_cache
    bos_token_id eos_token_id pad_token_id sep_token_id decoder_start_token_id initializer_range
    attention_dropout return_dict output_attentions output_hidden_states id2label label2id
    problem_type chunk_size_feed_forward is_encoder_decoder is_decoder add_cross_attention
    cross_attention_hidden_size tie_encoder_decoder torchscript use_bfloat16 tf_legacy_loss
    pruned_heads finetuning_task prefix task_specific_params tokenizer_class max_length min_length
    do_sample early_stopping num_beams num_beam_groups diversity_penalty temperature top_k top_p
    typical_p repetition_penalty length_penalty no_repeat_ngram_size encoder_no_repeat_ngram_size
    bad_words_ids num_return_sequences output_scores return_dict_in_generate forced_bos_token_id
    forced_eos_token_id remove_invalid_values exponential_decay_length_penalty suppress_tokens
    begin_suppress_tokens use_return_dict pretraining_tp max_position_embeddings _attn_implementation
""".split())

# Entries every supported type maps or checks (below), and the ones only some types have.
_MAPPED_KEYS = frozenset("""
    vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads
    head_dim hidden_act rms_norm_eps rope_theta rope_scaling rope_parameters tie_word_embeddings
""".split())
_TYPE_KEYS = {
    "llama": frozenset({"attention_bias", "mlp_bias"}),
    "mistral": frozenset({"sliding_window"}),
    "qwen2": frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "use_mrope"}),
}
O_PROJ_BIAS, Q_PROJ_BIAS = ".self_attn.o_proj.bias", ".self_attn.q_proj.bias"

# The pre-tokenizer of transformers' Qwen2Tokenizer (Qwen2's own tokenizer.json has it too).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# num_key_value_heads when config.json leaves it out: the config classes' defaults (Llama: n_head).
_KV_HEADS_DEFAULT = {"mistral": 8, "qwen2": 32}


# --- finding a checkpoint ----------------------------------------------------------------------------


def is_hf_checkpoint(value: str) -> bool:
    """Whether `model.init_from` names an HF checkpoint: `hf:ORG/NAME`, or a directory whose config.json
    is HF's (a `model_type`, no llmctl `family`)."""
    return value.startswith(HF_PREFIX) or HFModelDir(Path(value)).holds_hf_config()


def resolve_hf_dir(value: str) -> Path:
    """The local directory of an HF checkpoint: `value` itself, or for `hf:ORG/NAME[@REVISION]` its
    snapshot in the local Hugging Face cache (never the network)."""
    if not value.startswith(HF_PREFIX):
        return Path(value)
    name = value[len(HF_PREFIX):]
    repo, _, revision = name.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LlmctlError(f"{value}: expected hf:ORG/NAME (optionally @REVISION), e.g. hf:Qwen/Qwen2-0.5B.")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except HFValidationError as e:
        raise LlmctlError(f"{value}: not a valid repository name ({str(e).splitlines()[0]}).") from None
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        raise LlmctlError(
            f"{value}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); llmctl reads the cache "
            f"offline and never downloads. Fetch it where there is network (`hf download {repo}`) into that cache "
            "(HF_HUB_CACHE / HF_HOME), or point model.init_from at a local directory."
        ) from None


def read_hf_config(path: Path) -> dict[str, Any]:
    """An HF checkpoint's config.json, refusing a missing directory or file with what one should hold."""
    layout = HFModelDir(Path(path))
    if not layout.path.is_dir():
        raise LlmctlError(f"{layout.path}: no such directory.")
    if not layout.config.is_file():
        raise LlmctlError(
            f"{layout.path}: no config.json; neither an llmctl model dir nor a Hugging Face model dir "
            "(config.json, model.safetensors or shards with model.safetensors.index.json, tokenizer.json: what "
            "`save_pretrained` writes)."
        )
    try:
        config = json.loads(layout.config.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise LlmctlError(f"{layout.config}: not valid JSON ({e}).") from None
    if not isinstance(config, dict):
        raise LlmctlError(f"{layout.config}: expected a JSON object.")
    return config


# --- config.json -> the model section ----------------------------------------------------------------


def gpt_fields_from_hf(config: dict[str, Any], where: str, context_length: int) -> tuple[dict[str, Any], list[str]]:
    """The recipe's model-section values (SHAPE_KEYS) for an HF config, and notes on what was left out.

    Raises LlmctlError naming every config field the `gpt` family cannot reproduce: an architecture
    other than Llama, Mistral or Qwen2, scaled rotary embeddings, biases other than Qwen2's q/k/v,
    a sliding window shorter than `context_length` (tokens), fields this mapping does not know.
    """
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        foreign = sorted(k for k in config if k not in _GENERIC_KEYS | _MAPPED_KEYS)
        detail = f"; its fields with no Llama counterpart: {', '.join(foreign[:12])}" if foreign else ""
        architectures = config.get("architectures")
        raise LlmctlError(
            f"{where}: model_type {model_type!r}{f' ({architectures[0]})' if isinstance(architectures, list) and architectures else ''} "
            f"is not an architecture llmctl can import; it imports the Llama layout: model_type "
            f"{', '.join(ARCHITECTURES)}{detail}."
        )
    problems: list[str] = []
    notes: list[str] = []
    known = _GENERIC_KEYS | _MAPPED_KEYS | _TYPE_KEYS[model_type]

    architectures = config.get("architectures")
    if architectures not in (None, [ARCHITECTURES[model_type]]):
        problems.append(f"architectures {architectures}: llmctl maps {ARCHITECTURES[model_type]} only")
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in required if not isinstance(config.get(k), int) or isinstance(config.get(k), bool)]
    if missing:
        raise LlmctlError(f"{where}: {', '.join(missing)} missing or not an integer; a {model_type} config needs them.")
    d_model, n_head = config["hidden_size"], config["num_attention_heads"]
    n_kv_head = config.get("num_key_value_heads") or _KV_HEADS_DEFAULT.get(model_type) or n_head
    head_dim = config.get("head_dim")
    if head_dim is None:
        if d_model % n_head:
            problems.append(f"hidden_size {d_model} is not a multiple of num_attention_heads {n_head} (and no head_dim)")
        head_dim = d_model // n_head
    if n_head % n_kv_head:
        problems.append(f"num_key_value_heads {n_kv_head} does not divide num_attention_heads {n_head}")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r}: the gpt family's MLP is SwiGLU (silu)")

    rope_theta = config.get("rope_theta")
    rope = config.get("rope_parameters")
    if config.get("rope_scaling") is not None:
        problems.append(f"rope_scaling {config['rope_scaling']}: scaled rotary embeddings are not implemented")
    if isinstance(rope, dict):
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_parameters.rope_type {rope.get('rope_type')!r}: only the default rotary embedding is implemented")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            problems.append(f"rope_parameters.partial_rotary_factor {rope['partial_rotary_factor']}: rotary on part of a head is not implemented")
        rope_theta = rope.get("rope_theta", rope_theta)
    elif rope is not None:
        problems.append(f"rope_parameters {rope!r}: expected a mapping")
    if config.get("quantization_config") is not None:
        problems.append("quantization_config: a quantized checkpoint (GPTQ, AWQ, bitsandbytes, ...); start from its float weights")

    attention_bias = model_type == "qwen2"  # Qwen2 always has q/k/v biases; Llama and Mistral none
    if model_type == "llama":
        if config.get("attention_bias"):  # on q, k, v and o: o_proj's must be zero (checked as the weights load)
            attention_bias = True
            notes.append("attention_bias: o_proj's biases must be zero, as the gpt family has none there")
        if config.get("mlp_bias"):
            problems.append("mlp_bias true: the gpt family's MLP has no biases")
    window = config.get("sliding_window")
    if model_type == "mistral" and window is not None:
        if window < context_length:
            problems.append(
                f"sliding_window {window}: shorter than model.context_length {context_length}; sliding-window attention "
                f"is not implemented, so lower model.context_length to at most {window}"
            )
        else:
            notes.append(f"sliding_window {window} is no shorter than model.context_length {context_length}: full attention is the same")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        sliding = [i for i, t in enumerate(config.get("layer_types") or []) if t == "sliding_attention"]
        if config.get("layer_types") is None:  # older configs: the layers from max_window_layers on slide
            sliding = list(range(config.get("max_window_layers", 0), config["num_hidden_layers"]))
        if sliding and window is not None and window < context_length:
            problems.append(
                f"use_sliding_window with sliding_window {window} (layers {sliding[:4]}{'...' if len(sliding) > 4 else ''}): "
                f"shorter than model.context_length {context_length}; sliding-window attention is not implemented, so lower "
                f"model.context_length to at most {window}"
            )
    layer_types = config.get("layer_types")
    if layer_types is not None and model_type == "qwen2" and not config.get("use_sliding_window"):
        if any(t != "full_attention" for t in layer_types):
            notes.append("layer_types name sliding layers but use_sliding_window is false: all layers attend fully, as in transformers")
    if model_type == "qwen2" and config.get("use_mrope"):
        problems.append("use_mrope true: multimodal rotary embeddings (Qwen2-VL) are not implemented")
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and context_length > max_positions:
        problems.append(f"max_position_embeddings {max_positions}: model.context_length {context_length} is longer; lower it")

    # A field this mapping does not know may change the forward pass, unless it is switched off
    # (null or false) or private bookkeeping (a leading underscore).
    unknown = sorted(k for k in config if k not in known and config[k] not in (None, False) and not k.startswith("_"))
    if unknown:
        problems.append(f"{', '.join(unknown)}: not fields of a plain {model_type} config; llmctl does not know how to map them")
    if problems:
        raise LlmctlError(f"{where}: cannot import this {model_type} checkpoint: " + "; ".join(problems) + ".")

    fields = {
        "n_layer": config["num_hidden_layers"],
        "n_head": n_head,
        "n_kv_head": n_kv_head,
        "d_model": d_model,
        "head_dim": None if head_dim * n_head == d_model else head_dim,
        "d_ff": config["intermediate_size"],
        "vocab_size": config["vocab_size"],
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),  # False: all three classes' default
        "rope_theta": float(rope_theta if rope_theta is not None else 10000.0),
        "norm_eps": float(config.get("rms_norm_eps", 1e-6)),
        "attention_bias": attention_bias,
    }
    return fields, notes


def gpt_tensor_shapes(fields: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the `gpt` model a model section describes, with its shape (HF's names)."""
    d, n_layer, n_head = fields["d_model"], fields["n_layer"], fields["n_head"]
    n_kv = fields.get("n_kv_head") or n_head
    hs = fields.get("head_dim") or d // n_head
    d_ff, vocab = fields["d_ff"], fields["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (n_head * hs, d),
            p + "self_attn.k_proj.weight": (n_kv * hs, d),
            p + "self_attn.v_proj.weight": (n_kv * hs, d),
            p + "self_attn.o_proj.weight": (d, n_head * hs),
            p + "mlp.gate_proj.weight": (d_ff, d),
            p + "mlp.up_proj.weight": (d_ff, d),
            p + "mlp.down_proj.weight": (d, d_ff),
        })
        if fields.get("attention_bias"):
            shapes.update({p + "self_attn.q_proj.bias": (n_head * hs,), p + "self_attn.k_proj.bias": (n_kv * hs,),
                           p + "self_attn.v_proj.bias": (n_kv * hs,)})
    shapes["lm_head.weight"] = (vocab, d)
    return shapes


def hf_eos_token(path: Path) -> str | None:
    """The end-of-sequence token of an HF checkpoint: tokenizer_config.json's eos_token, else the token of
    config.json's (or generation_config.json's) eos_token_id in tokenizer.json."""
    layout = HFModelDir(Path(path))
    eos = _read_json(layout.tokenizer_config).get("eos_token")
    if isinstance(eos, dict):
        eos = eos.get("content")
    if isinstance(eos, str) and eos:
        return eos
    ids = _read_json(layout.config).get("eos_token_id")
    if ids is None:
        ids = _read_json(layout.generation_config).get("eos_token_id")
    first = ids[0] if isinstance(ids, list) and ids else ids
    if not isinstance(first, int):
        return None
    tokens = {t.get("id"): t.get("content") for t in _read_json(layout.tokenizer).get("added_tokens", []) if isinstance(t, dict)}
    return tokens.get(first)


def hf_chat_template(path: Path) -> str | None:
    """The chat template an HF checkpoint ships (tokenizer_config.json's, or chat_template.jinja), if any."""
    layout = HFModelDir(Path(path))
    template = _read_json(layout.tokenizer_config).get("chat_template")
    if isinstance(template, str) and template:
        return template
    jinja = layout.path / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


# --- weights -----------------------------------------------------------------------------------------


def safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from a .safetensors file's JSON header (the tensors themselves are not read)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
        raise LlmctlError(f"{path}: not a readable safetensors file ({e}).") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def hf_weight_index(path: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Tensor name -> (safetensors file, shape) for an HF checkpoint, one file or sharded."""
    layout = HFModelDir(Path(path))
    if layout.weights_index.is_file():
        weight_map = _read_json(layout.weights_index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LlmctlError(f"{layout.weights_index}: no weight_map; the shard index is damaged.")
        files = sorted(set(weight_map.values()))
    elif layout.weights.is_file():
        files = [layout.weights.name]
    else:
        others = sorted(p.name for p in layout.path.glob("*.safetensors"))
        if others:
            files = others
        elif any(layout.path.glob("*.bin")) or any(layout.path.glob("*.pt*")):
            raise LlmctlError(
                f"{layout.path}: weights in PyTorch pickle files only; llmctl reads safetensors. Convert them with "
                "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
            )
        else:
            raise LlmctlError(f"{layout.path}: no model.safetensors (nor shards with model.safetensors.index.json).")
    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for name in files:
        file = layout.path / name
        if not file.is_file():
            raise LlmctlError(f"{layout.weights_index}: names shard {name}, which is missing from {layout.path}.")
        for tensor, shape in safetensors_header(file).items():
            index[tensor] = (file, shape)
    return index


def check_hf_weights(
    path: Path, expected: dict[str, tuple[int, ...]], *, optional: frozenset[str] = frozenset(), ignored: frozenset[str] = frozenset()
) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """The weight index of `path`, checked against the shapes its config describes (`expected`).

    Names in `optional` may be absent (a tied output head); names in `ignored`, rotary caches and
    o_proj biases (which `load_hf_tensors` requires to be zero) may be present without being
    expected. Raises LlmctlError naming the file and tensor of each mismatch.
    """
    index = hf_weight_index(path)
    ignored = ignored | {k for k in index if k.endswith(O_PROJ_BIAS) and k[: -len(O_PROJ_BIAS)] + Q_PROJ_BIAS in expected}
    wrong = [
        f"{index[k][0].name}: {k} is {list(index[k][1])}, config.json describes {list(shape)}"
        for k, shape in expected.items() if k in index and tuple(index[k][1]) != tuple(shape)
    ]
    missing = sorted(k for k in expected if k not in index and k not in optional)
    extra = sorted(k for k in index if k not in expected and k not in ignored and not k.endswith("rotary_emb.inv_freq"))
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise LlmctlError(
            f"{path}: the safetensors do not match config.json: {'; '.join(wrong[:3])}{more}; the weights and "
            "config.json come from different models."
        )
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}"] if missing else []) + (
            [f"unexpected {', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}"] if extra else [])
        raise LlmctlError(f"{path}: the safetensors do not match config.json ({'; '.join(parts)}).")
    return index


def load_hf_tensors(index: dict[str, tuple[Path, tuple[int, ...]]], names: list[str]) -> dict[str, Any]:
    """The named tensors as float32 torch tensors, read file by file from a checked weight index.

    A Llama checkpoint with attention_bias has o_proj biases too; they must be zero (the `gpt` family
    has none there), else LlmctlError names the first that is not.
    """
    from safetensors import SafetensorError, safe_open

    o_biases = [k for k in index if k.endswith(O_PROJ_BIAS) and k not in names]
    by_file: dict[Path, list[str]] = {}
    for name in [*names, *o_biases]:
        by_file.setdefault(index[name][0], []).append(name)
    tensors = {}
    for file, wanted in by_file.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in wanted:
                    tensors[name] = f.get_tensor(name).float()
        except (SafetensorError, OSError) as e:
            raise LlmctlError(f"{file}: cannot read the weights ({e}).") from None
    for name in o_biases:
        largest = float(tensors.pop(name).abs().max())
        if largest > 0:
            raise LlmctlError(
                f"{index[name][0]}: {name} is not zero (up to {largest:.3g}); the gpt family has no o_proj bias, so "
                "this Llama checkpoint (attention_bias true) cannot be imported exactly."
            )
    return tensors


# --- the model section of a recipe -------------------------------------------------------------------


def hf_recipe_updates(
    init_from: str, model: dict[str, Any], data: dict[str, Any], fixed: set[str]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model- and data-section values a recipe takes from the HF checkpoint `init_from` names.

    `model`/`data` are the recipe's sections as written (model with its context_length, tokens);
    `fixed` the dotted keys the command line set (a shape key set there to another value is refused
    rather than silently replaced). The checkpoint's weights are
    checked against its config here, before any work. Data: its tokenizer.json when data.tokenizer
    is unset, and its end-of-sequence token as the end-of-text token when data.special_tokens is.
    """
    path = resolve_hf_dir(init_from)
    config = read_hf_config(path)
    layout = HFModelDir(path)
    if model.get("family", "gpt") != "gpt":
        raise LlmctlError(f"model.family {model['family']}: a Hugging Face checkpoint is a gpt-family (Llama) model; set model.family: gpt.")
    fields, _ = gpt_fields_from_hf(config, str(layout.config), model["context_length"])
    clashes = [f"model.{k}={model[k]} (the checkpoint has {fields[k]})" for k in SHAPE_KEYS
               if f"model.{k}" in fixed and model.get(k) != fields[k]]
    if clashes:
        raise LlmctlError(
            f"{', '.join(clashes)}: the model's shape comes from {init_from}'s config.json when model.init_from is a "
            "Hugging Face checkpoint; drop the override."
        )
    shapes = gpt_tensor_shapes(fields)
    check_hf_weights(path, shapes, optional=frozenset({"lm_head.weight"}) if fields["tie_embeddings"] else frozenset(),
                     ignored=frozenset({"lm_head.weight"}))
    data_updates: dict[str, Any] = {}
    if not data.get("tokenizer"):
        if not layout.tokenizer.is_file():
            raise LlmctlError(
                f"{path}: no tokenizer.json (a SentencePiece tokenizer.model alone is not read); save the fast tokenizer "
                "there with transformers (AutoTokenizer.from_pretrained(dir).save_pretrained(dir)), or set data.tokenizer."
            )
        data_updates["tokenizer"] = str(layout.tokenizer)
    if "special_tokens" not in data:
        eos = hf_eos_token(path)
        if eos:
            data_updates["special_tokens"] = [eos]
    return fields, data_updates


def describe_hf_import(init_from: str, context_length: int) -> list[str]:
    """Lines for a person: which checkpoint a run starts from, its shape, and what the mapping left out."""
    path = resolve_hf_dir(init_from)
    config = read_hf_config(path)
    fields, notes = gpt_fields_from_hf(config, str(HFModelDir(path).config), context_length)
    kv = f" ({fields['n_kv_head']} key/value)" if fields["n_kv_head"] != fields["n_head"] else ""
    lines = [
        f"starting from {init_from}: {config['model_type']}, {fields['n_layer']} layers, d_model {fields['d_model']}, "
        f"{fields['n_head']} heads{kv}, vocab {fields['vocab_size']}"
        + (", q/k/v biases" if fields["attention_bias"] else "") + (", tied embeddings" if fields["tie_embeddings"] else "")
    ]
    return lines + [f"  note: {n}" for n in notes]


# --- the other way: llmctl -> HF files ---------------------------------------------------------------


def hf_architecture(config: dict[str, Any], tokenizer: Any) -> str:
    """The model_type a `gpt` model (its config dict) is exported as: "llama", or "qwen2" when it has
    attention biases and Qwen2's tokenizer pipeline.

    transformers 5 rebuilds the tokenizer of every qwen2 model with Qwen2's pre-tokenizer, so a model
    with biases and any other tokenizer goes out as Llama with attention_bias (and zero o_proj biases):
    the same function, and AutoTokenizer then reads tokenizer.json as it is.
    """
    return "qwen2" if config.get("attention_bias") and has_qwen2_pipeline(tokenizer) else "llama"


def has_qwen2_pipeline(tokenizer: Any) -> bool:
    """Whether a `tokenizers` tokenizer splits text as transformers' Qwen2Tokenizer does: NFC, then
    Qwen2's regex, then byte-level BPE."""
    try:
        spec = json.loads(tokenizer.to_str())
    except (ValueError, AttributeError):
        return False
    normalizer, pre = spec.get("normalizer") or {}, spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if normalizer.get("type") != "NFC" or len(parts) != 2 or (spec.get("model") or {}).get("type") != "BPE":
        return False
    split, byte_level = parts
    return (
        split.get("type") == "Split" and (split.get("pattern") or {}).get("Regex") == QWEN2_PRETOKENIZE_REGEX
        and split.get("behavior") == "Isolated" and not split.get("invert")
        and byte_level.get("type") == "ByteLevel" and not byte_level.get("add_prefix_space") and not byte_level.get("use_regex")
    )


def hf_config_from_gpt(config: dict[str, Any], model_type: str, *, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """The transformers config.json of a `gpt` model (its config dict) as `model_type` (`hf_architecture`).

    Rotary settings are written both the transformers 4 way (rope_theta) and the 5 way
    (rope_parameters), so either reads them."""
    n_head = config["n_head"]
    head_dim = config.get("head_dim") or config["d_model"] // n_head
    qwen2 = model_type == "qwen2"
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": config["vocab_size"],
        "hidden_size": config["d_model"],
        "intermediate_size": config["d_ff"],
        "num_hidden_layers": config["n_layer"],
        "num_attention_heads": n_head,
        "num_key_value_heads": config.get("n_kv_head") or n_head,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config["context_length"],
        "rms_norm_eps": config["norm_eps"],
        "rope_theta": config["rope_theta"],
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": config["rope_theta"]},
        "tie_word_embeddings": bool(config.get("tie_embeddings")),
        "attention_dropout": 0.0,
        "initializer_range": config.get("init_std", 0.02),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if qwen2:
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": config["n_layer"],
                    "layer_types": ["full_attention"] * config["n_layer"]})
    else:
        out.update({"attention_bias": bool(config.get("attention_bias")), "mlp_bias": False, "pretraining_tp": 1})
    return out


def leading_special_token(tokenizer: Any) -> str | None:
    """The special token the tokenizer's post-processor puts before every text (a BOS such as <s>), if any."""
    try:
        processor = json.loads(tokenizer.to_str()).get("post_processor")
    except (ValueError, AttributeError):
        return None

    def first(p: Any) -> str | None:
        if not isinstance(p, dict):
            return None
        if p.get("type") == "Sequence":
            return next((t for t in map(first, p.get("processors", [])) if t), None)
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            head = single[0] if single else {}
            return head.get("SpecialToken", {}).get("id") if isinstance(head, dict) else None
        return None

    return first(processor)


def hf_tokenizer_config(*, bos: str | None, eos: str | None, chat_template: str | None, context_length: int) -> dict[str, Any]:
    """tokenizer_config.json for a tokenizer.json: the fast tokenizer as it is, its special tokens and chat template."""
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": eos,  # batched encodes need one; no id of its own, as in Llama checkpoints
    }
    if chat_template:
        config["chat_template"] = chat_template
    return config
