"""Hugging Face config -> Megatron `TransformerConfig` + `GPTModel` (Qwen3, Qwen2, Llama families).

    cfg = load_hf_config("path/to/hf_model")           # or a transformers config object
    model = build_gpt_model(cfg)                        # after dist.init_distributed(tp, pp)
    model.return_hidden_states = True                   # last stage returns final-norm hidden [s, b, h]
    w = lm_head_weight(model)                           # [V_local_padded, H], this TP rank's vocab rows

Vocabulary padding: the embedding / output layer have `padded_vocab_size(V, tp)` rows (a multiple of
tp*128) split contiguously over TP ranks. Padded rows are zero after loading a HF checkpoint, are
dropped when exporting to HF, and every consumer of logits must mask global rows >= V: the fused
kernels do so given `vocab_shard_info(model, V)`; callers of the logits path slice `[..., :V]`.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("qwen3", "qwen2", "llama")


def load_hf_config(path_or_config):
    """A transformers `PretrainedConfig` from a model dir / config.json path, or passed through."""
    if not isinstance(path_or_config, (str, os.PathLike)):
        return path_or_config
    import transformers

    path = Path(path_or_config)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise ValueError(f"no config.json in {path}")
    return transformers.AutoConfig.from_pretrained(str(path))


def padded_vocab_size(vocab_size: int, tp_size: int = 1, multiple: int = 128) -> int:
    """Smallest multiple of tp_size*multiple that is >= vocab_size (every TP shard gets equal rows)."""
    step = multiple * tp_size
    return ((vocab_size + step - 1) // step) * step


def _rope_settings(hf_config) -> tuple[float, bool, float]:
    """(theta, llama3_scaling, factor); ValueError for RoPE variants megatron-core's GPTModel lacks."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise ValueError("config has no rope_theta")
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return float(theta), False, 1.0
    if rope_type == "llama3":
        src = {**scaling, **params}
        expected = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        for key, value in expected.items():
            if float(src.get(key, value)) != value:
                raise ValueError(f"rope llama3 scaling with {key}={src[key]} is unsupported (megatron-core fixes {value})")
        return float(theta), True, float(src.get("factor", 8.0))
    raise ValueError(f"unsupported rope type {rope_type!r} (supported: default, llama3)")


def check_supported(hf_config) -> str:
    """Returns the model_type; ValueError naming the field for anything the converter can't express."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r} is unsupported (SwiGLU with silu only)")
    if getattr(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is unsupported")
    if model_type != "qwen2" and getattr(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is unsupported for this family (o_proj bias)")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is unsupported")
    if getattr(hf_config, "num_experts", None):
        raise ValueError("mixture-of-experts configs are unsupported")
    _rope_settings(hf_config)
    return model_type


def head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def num_kv_heads(hf_config) -> int:
    return getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads


def transformer_config_from_hf(hf_config, *, tp_size: int | None = None, pp_size: int | None = None,
                               params_dtype: torch.dtype = torch.float32, use_te: bool | None = None, **overrides):
    """Megatron `TransformerConfig` for the HF config; TP/PP sizes default to the live parallel_state.

    Fusions follow the layer spec (`use_te`, default: TE imports and a GPU is present): the local spec's
    `WrappedTorchNorm` asserts `persist_layer_norm` is off, and `masked_softmax_fusion` needs a CUDA
    extension the megatron-core wheel does not ship, so both are on only with Transformer Engine."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    check_supported(hf_config)
    if tp_size is None:
        tp_size = parallel_state.get_tensor_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    if pp_size is None:
        pp_size = parallel_state.get_pipeline_model_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1
    num_heads, num_groups = hf_config.num_attention_heads, num_kv_heads(hf_config)
    if num_groups % tp_size != 0 or num_heads % tp_size != 0:
        raise ValueError(f"num_key_value_heads={num_groups} and num_attention_heads={num_heads} must be "
                         f"divisible by tp_size={tp_size}")
    if hf_config.num_hidden_layers % pp_size != 0:
        raise ValueError(f"num_hidden_layers={hf_config.num_hidden_layers} is not divisible by pp_size={pp_size}")
    on_gpu = torch.cuda.is_available()
    if use_te is None:
        use_te = te_available()
    kwargs = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=num_heads,
        num_query_groups=num_groups,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(hf_config, "attention_bias", False)) or hf_config.model_type == "qwen2",
        qk_layernorm=hf_config.model_type == "qwen3",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        pipeline_model_parallel_size=pp_size,
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        # bias-activation / bias-dropout fusions are torch-jit (any GPU); the others need TE (see docstring).
        # RoPE and gradient-accumulation fusion are opt-in (parallel.* through derived_args).
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=on_gpu and use_te,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=on_gpu and use_te,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        # RL micro-batches differ in length: PP p2p then exchanges shapes first. (The MoE dispatcher
        # setting is irrelevant for dense models but megatron rejects the default with this flag.)
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def te_available() -> bool:
    """True when Transformer Engine imports and a GPU is present (then the TE layer spec is used)."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return False
    return True


class SequenceParallelTorchNorm:
    """torch RMSNorm for the local spec under sequence parallelism. megatron-core's `WrappedTorchNorm`
    refuses SP only because it does not tag its weight: a norm is per token, so on a sequence slice it
    computes the right values, and its weight gradient is a partial sum over this rank's tokens that
    `finalize_model_grads` all-reduces over TP for parameters marked `sequence_parallel`."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        if config.normalization != "RMSNorm":
            raise ValueError(f"SequenceParallelTorchNorm: normalization {config.normalization!r} is not RMSNorm")
        norm = torch.nn.RMSNorm(normalized_shape=hidden_size, eps=eps)
        norm.weight.sequence_parallel = True
        return norm


def _replace_norms(spec, new):
    """A copy of a (nested) ModuleSpec with every WrappedTorchNorm replaced by `new`."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return new
    if isinstance(spec, ModuleSpec):
        module = new if spec.module is WrappedTorchNorm else spec.module
        return dataclasses.replace(spec, module=module, submodules=_replace_norms(spec.submodules, new))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _replace_norms(getattr(spec, f.name), new)
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def layer_spec(config, *, use_te: bool | None = None):
    """Transformer Engine spec when TE imports and a GPU is present, else megatron-core's local spec.

    Local spec under sequence parallelism: a block spec (this stage's layers + final norm) whose torch
    norms are `SequenceParallelTorchNorm` (megatron-core 0.16's torch norm asserts SP is off)."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_te is None:
        use_te = te_available()
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec = gpt_layer_specs.get_gpt_layer_local_spec(qk_layernorm=config.qk_layernorm, normalization="RMSNorm")
    if not config.sequence_parallel:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    spec = _replace_norms(spec, SequenceParallelTorchNorm)
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config),
                                      layer_norm=SequenceParallelTorchNorm)


def _make_model_class():
    from megatron.core.models.gpt import GPTModel

    class HiddenStateGPTModel(GPTModel):
        """GPTModel whose last stage can return the final-norm hidden states `[s, b, h]` instead of logits.

        With `return_hidden_states = True` the output layer is skipped entirely, so training never builds
        a [tokens x vocab] logits tensor; the fused kernels take these hidden states plus
        `lm_head_weight(model)`. Non-final PP stages behave as in GPTModel (they return hidden states).
        """

        return_hidden_states: bool = False

        def _postprocess(self, hidden_states, *args, **kwargs):
            if self.return_hidden_states and self.post_process and not kwargs.get("mtp_in_postprocess"):
                return hidden_states  # the decoder already applied final_layernorm on this stage
            return super()._postprocess(hidden_states, *args, **kwargs)

    return HiddenStateGPTModel


_MODEL_CLASS: dict = {}


def __getattr__(name):  # lazy: importing this module must not import megatron-core
    if name == "HiddenStateGPTModel":
        if "cls" not in _MODEL_CLASS:
            _MODEL_CLASS["cls"] = _make_model_class()
        return _MODEL_CLASS["cls"]
    raise AttributeError(name)


def build_gpt_model(hf_config, *, params_dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                    max_sequence_length: int | None = None, **config_overrides):
    """Builds this rank's model chunk (pre/post_process from the PP rank) with freshly initialised weights.

    Load weights afterwards with `megatron_copsd.checkpoint.convert.load_hf_into_model`.
    """
    from megatron.core import parallel_state

    from megatron_copsd.megatron.cpu_compat import enable_cpu_compat, ensure_model_parallel_rng

    if not torch.cuda.is_available():
        enable_cpu_compat()
    if not parallel_state.model_parallel_is_initialized():
        raise ValueError("build_gpt_model needs megatron parallel_state: call dist.init_distributed(tp, pp) first")
    ensure_model_parallel_rng()
    hf_config = load_hf_config(hf_config)
    if use_te is None:
        use_te = te_available()
    config = transformer_config_from_hf(hf_config, params_dtype=params_dtype, use_te=use_te, **config_overrides)
    theta, rope_scaling, rope_factor = _rope_settings(hf_config)
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    cls = __getattr__("HiddenStateGPTModel")
    model = cls(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te=use_te),
        vocab_size=padded_vocab_size(hf_config.vocab_size, tp_size),
        max_sequence_length=max_sequence_length or hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=bool(getattr(hf_config, "tie_word_embeddings", False)),
        position_embedding_type="rope",
        rotary_base=int(theta) if float(theta).is_integer() else theta,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def unwrap_model(model):
    """Strips DDP / Float16Module wrappers (anything with a `.module`) down to the GPTModel."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def lm_head_weight(model) -> torch.Tensor:
    """This TP rank's LM-head rows `[V_local_padded, H]`: the output layer, or the tied embedding shard."""
    inner = unwrap_model(model)
    if not inner.post_process:
        raise ValueError("lm_head_weight: this pipeline stage has no output layer (post_process=False)")
    if inner.share_embeddings_and_output_weights:
        return inner.shared_embedding_or_output_weight()
    return inner.output_layer.weight


def vocab_shard_info(model, valid_vocab: int) -> tuple[int, int]:
    """(vocab_start, valid_vocab): global id of this rank's first LM-head row, and the unpadded vocab.

    Kernels must exclude global rows >= valid_vocab (the padding) from every softmax.
    """
    from megatron.core import parallel_state

    rows = lm_head_weight(model).shape[0]
    return parallel_state.get_tensor_model_parallel_rank() * rows, int(valid_vocab)
