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


#: The label layout of the tiny OrthoDiffusion model: background + the knee phantoms' structures.
TINY_ORTHODIFFUSION_CLASSES = ("background", "femur", "tibia", "patella", "cartilage", "medial_meniscus",
                               "lateral_meniscus", "acl", "pcl", "mcl", "lcl", "effusion")


def tiny_orthodiffusion(directory: Path, size: int = 64, depth: int = 16, seed: int = 0) -> Path:
    """A random OrthoDiffusion folder (``orthodiffusion.json``) for volumes of ``depth`` x ``size`` x ``size``: three
    plane UNets of the real depth at 32 channels throughout (GroupNorm needs 32), a knee head with the eight labels
    and a segmentation head with :data:`TINY_ORTHODIFFUSION_CLASSES`. Seconds per study on a CPU."""
    import json

    import torch
    from torch import nn

    from engines.orthodiffusion.network import SegHead3D, UNet3D, UNet3DConfig, layer_channels

    torch.manual_seed(seed)
    config = UNet3DConfig(model_channels=32, channel_mult=(1, 1, 1, 1, 1))
    directory.mkdir(parents=True, exist_ok=True)
    planes = []
    for index, (plane, timestep, layer) in enumerate((("sagittal", 200, "mid_0"), ("coronal", 150, "mid_0"),
                                                      ("axial", 50, "mid_2"))):
        torch.save(UNet3D(config).state_dict(), directory / f"{plane}.pt")
        planes.append({"name": plane, "weights": f"{plane}.pt", "timestep": timestep, "layer": layer})
    features = sum(layer_channels(config)[p["layer"]] for p in planes)
    head = nn.Sequential()
    head.net = nn.Linear(features, 8)  # their LinearOrMLP: net.weight / net.bias
    torch.save(head.state_dict(), directory / "knee_head.pt")
    torch.save(SegHead3D(layer_channels(config)["mid_2"], len(TINY_ORTHODIFFUSION_CLASSES)).state_dict(),
               directory / "seghead.pt")
    (directory / "orthodiffusion.json").write_text(json.dumps({
        "format": "msknode-orthodiffusion/1", "name": "orthodiffusion-tiny", "version": "test", "seed": seed,
        "unet": config.to_dict(), "input": {"depth": depth, "size": size}, "planes": planes,
        "heads": [{"name": "knee", "file": "knee_head.pt"}],
        "segmentation": {"plane": "sagittal", "weights": "seghead.pt", "classes": len(TINY_ORTHODIFFUSION_CLASSES),
                         "class_names": list(TINY_ORTHODIFFUSION_CLASSES)},
    }, indent=1))
    return directory
