"""Transformers: LlamaGen's class-conditional GPT and CTF's auxiliary fine-token model."""

from ctfgen.models.llamagen import extract_state_dict, llamagen_generate, load_llamagen_gpt
from ctfgen.models.transformer import (
    AUX_PRESETS,
    GPT,
    GPT_PRESETS,
    AuxConfig,
    AuxModel,
    ClusterTable,
    GPTConfig,
    apply_rotary_emb,
    cluster_table,
    precompute_freqs_cis_2d,
)

__all__ = [
    "AUX_PRESETS",
    "GPT",
    "GPT_PRESETS",
    "AuxConfig",
    "AuxModel",
    "ClusterTable",
    "GPTConfig",
    "apply_rotary_emb",
    "cluster_table",
    "extract_state_dict",
    "llamagen_generate",
    "load_llamagen_gpt",
    "precompute_freqs_cis_2d",
]
