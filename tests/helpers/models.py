"""A small random MAE in the SKELEX folder format, for pipeline tests that need a real model but not the demo's."""

from __future__ import annotations

from pathlib import Path


def tiny_model(directory: Path, width: int = 64, layers: int = 2) -> Path:
    import torch

    from engines.mae.loaders import save_hf_vitmae
    from engines.mae.network import MAEConfig, MaskedAutoencoderViT

    torch.manual_seed(0)
    config = MAEConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=2 * width, decoder_hidden_size=32, decoder_num_hidden_layers=1,
                       decoder_num_attention_heads=2, decoder_intermediate_size=64)
    return save_hf_vitmae(MaskedAutoencoderViT(config), directory)
