"""Decode and preprocess timings per transfer syntax for a realistic 2500 x 2048 12-bit radiograph.

For each syntax: stream size, full-size decode time with every installed pydicom plugin, reduced-
resolution decode (JPEG 2000 / HTJ2K) at the level the model path needs (both sides >= 448, the
default, or >= 224, the fastest) and at the level a 1024-px overlay needs, and the whole ``preprocess``
per image (display 2048, and no display). Also the resize choice (PIL bilinear vs torch
antialiased interpolate) and how far a reduced decode moves the model input. The image has no VOI window,
so the node itself decodes it at full size (``preprocess``); the reduced columns ask for the reduced decode
explicitly (``reduced_without_window=True``) to measure the decoder. Medians of ``--repeat`` runs,
single-threaded Python process.

    .venv/bin/python benchmarks/decode.py [--repeat 3] [--markdown] [--only j2k_lossless,rle]

Synthetic images are encoded at run time with the helpers in ``tests/engines/dicom_fixtures.py``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engines.imaging.decode import (  # noqa: E402
    PREFERRED_PLUGINS,
    WAVELET_SYNTAXES,
    choose_reduce_level,
    decode_frame,
    frame_fragment,
    parse_j2k_header,
)
from engines.imaging.preprocess import preprocess  # noqa: E402
from tests.engines.dicom_fixtures import (  # noqa: E402
    SYNTAXES,
    encode,
    make_dataset,
    missing_tool,
    synthetic_radiograph,
)

ROWS, COLUMNS = 2500, 2048


def median_ms(function: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}"


def bench_syntax(key: str, original: np.ndarray, work: Path, repeat: int) -> dict[str, object]:
    from pydicom.pixels import get_decoder

    syntax = SYNTAXES[key]
    bits = 8 if syntax.eight_bit_only else 12
    pixels = (original >> 4).astype(np.uint8) if bits == 8 else original
    ds = encode(make_dataset(pixels, bits_stored=bits), key, work)
    size = len(ds.PixelData)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    plugins = sorted(decoder.available_plugins) or [""]
    per_plugin = {}
    for plugin in plugins:
        try:
            per_plugin[plugin or "pydicom"] = median_ms(
                lambda: decoder.as_array(ds, index=0, decoding_plugin=plugin), repeat
            )
        except Exception as exc:  # noqa: BLE001 - report, keep going
            per_plugin[plugin or "pydicom"] = float("nan")
            print(f"  {key}: plugin {plugin} failed: {exc}", file=sys.stderr)
    row: dict[str, object] = {"key": key, "uid": str(ds.file_meta.TransferSyntaxUID), "bits": bits, "mb": size / 1e6,
                              "ratio": pixels.size * (2 if bits > 8 else 1) / size, "plugins": per_plugin,
                              "chosen": " > ".join(PREFERRED_PLUGINS.get(str(ds.file_meta.TransferSyntaxUID),
                                                                         ("pydicom",)))}
    if str(ds.file_meta.TransferSyntaxUID) in WAVELET_SYNTAXES:
        header = parse_j2k_header(frame_fragment(ds, 0))
        cases = (("model448", 448, None), ("model224", 224, None), ("d1024", 448, 1024))
        for label, side, display in cases:
            level = choose_reduce_level(
                ROWS, COLUMNS, header.decomposition_levels, model_size=side, display_size=display
            )
            row[f"reduced_{label}"] = (
                level,
                median_ms(lambda: decode_frame(ds, 0, model_size=side, display_size=display), repeat),
            )
        full = preprocess(ds, display_size=None, reduced_decode=False).tensor
        for side in (448, 224):
            reduced = preprocess(ds, display_size=None, min_decoded_side=side, reduced_without_window=True).tensor
            row[f"input_shift_{side}"] = float((full - reduced).abs().mean()), float((full - reduced).abs().max())
    row["pre_default"] = median_ms(lambda: preprocess(ds, display_size=2048), repeat)
    row["pre_nodisplay"] = median_ms(lambda: preprocess(ds, display_size=None, reduced_without_window=True), repeat)
    return row


def bench_resize(original: np.ndarray, repeat: int) -> dict[str, float]:
    """PIL bilinear (what HF's ViTImageProcessor runs) vs torch's antialiased bilinear interpolate."""
    import torch
    from PIL import Image

    from engines.imaging.preprocess import to_uint8_minmax

    image8 = to_uint8_minmax(original)
    pil = lambda: np.asarray(  # noqa: E731
        Image.fromarray(image8).resize((224, 224), resample=Image.Resampling.BILINEAR)
    )
    tensor = torch.from_numpy(image8.astype(np.float32))[None, None]
    torch_resize = lambda: torch.nn.functional.interpolate(  # noqa: E731
        tensor, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
    )[0, 0].numpy()
    difference = np.abs(pil().astype(np.float64) - torch_resize())
    difference_rounded = np.abs(pil().astype(np.float64) - np.clip(np.round(torch_resize()), 0, 255))
    return {"pil_ms": median_ms(pil, repeat), "torch_ms": median_ms(torch_resize, repeat),
            "max_diff": float(difference.max()), "max_diff_rounded": float(difference_rounded.max()),
            "mean_diff_rounded": float(difference_rounded.mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="", help="comma-separated syntax keys")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables for docs/benchmarks.md")
    args = parser.parse_args()
    keys = [k for k in SYNTAXES if not args.only or k in args.only.split(",")]
    original = synthetic_radiograph(ROWS, COLUMNS, bits=12, seed=0)

    from rich.console import Console
    from rich.progress import track
    from rich.table import Table

    console = Console(stderr=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in track(keys, description="decoding", console=console):
            if (tool := missing_tool(key)) is not None:
                console.print(f"skip {key}: {tool} not installed")
                continue
            rows.append(bench_syntax(key, original, Path(tmp) / key, args.repeat))
    resize = bench_resize(original, max(args.repeat, 5))

    def plugin_text(row: dict) -> str:
        return ", ".join(f"{name} {ms:.0f}" for name, ms in row["plugins"].items())

    def reduced_text(row: dict, label: str) -> str:
        value = row.get(f"reduced_{label}")
        return f"r{value[0]}: {value[1]:.0f}" if value else "-"

    headers = ["syntax", "UID", "MB", "ratio", "full decode ms (plugin)", "chosen",
               "reduced ms, sides >= 448", "reduced ms, sides >= 224", "reduced ms, 1024 overlay",
               "preprocess ms (display 2048)", "preprocess ms (no display, reduced)"]
    lines = [[r["key"], r["uid"], f"{r['mb']:.2f}", f"{r['ratio']:.1f}", plugin_text(r), r["chosen"],
              reduced_text(r, "model448"), reduced_text(r, "model224"), reduced_text(r, "d1024"),
              f"{r['pre_default']:.0f}", f"{r['pre_nodisplay']:.0f}"] for r in rows]
    shifts = [(f"{r['key']}, sides >= {side}", r[f"input_shift_{side}"])
              for r in rows for side in (448, 224) if f"input_shift_{side}" in r]
    if args.markdown:
        print(f"Machine: {machine()}. Image: {ROWS} x {COLUMNS}, 12-bit (8-bit for baseline JPEG), "
              f"median of {args.repeat}.\n")
        print("| " + " | ".join(headers) + " |")
        print("|" + "---|" * len(headers))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        print()
        for key, (mean, peak) in shifts:
            print(f"- {key}: model input, reduced vs full decode: mean |diff| {mean:.4f}, max {peak:.4f} "
                  "(normalised units; one uint8 grey level = 0.0175)")
        print(f"- resize 2500x2048 -> 224: PIL bilinear {resize['pil_ms']:.1f} ms, torch antialias "
              f"{resize['torch_ms']:.1f} ms; max |PIL - torch| {resize['max_diff']:.2f} grey levels "
              f"({resize['max_diff_rounded']:.0f} after rounding, mean {resize['mean_diff_rounded']:.3f})")
        return
    table = Table(title=f"Decode, {ROWS} x {COLUMNS} ({machine()})")
    for header in headers:
        table.add_column(header)
    for line in lines:
        table.add_row(*line)
    Console(width=240).print(table)
    for key, (mean, peak) in shifts:
        print(f"{key}: reduced vs full model input: mean |diff| {mean:.4f}, max {peak:.4f}")
    print(f"resize: {resize}")


if __name__ == "__main__":
    main()
