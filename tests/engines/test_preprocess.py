"""Preprocessing policy: SKELEX parity, LUT order, VOI policy, MONOCHROME1, colour, display, geometry."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image, ImageOps
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from engines.imaging.decode import PreprocessError
from engines.imaging.preprocess import IMAGENET_MEAN, IMAGENET_STD, prepare_array, preprocess, to_uint8_minmax
from tests.engines.dicom_fixtures import make_dataset, synthetic_radiograph

MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)
ONE_GREY_LEVEL = 1 / 255 / min(IMAGENET_STD)  # one uint8 step, in normalised units


def skelex_reference(pixels: np.ndarray) -> np.ndarray:
    """SKELEX's load-and-process path, re-implemented from its description, on the same pixels.

    The array goes through a 16-bit PNG file (what SKELEX reads), ``load_rgb_8bit`` (PIL open, EXIF
    transpose, float32 global min-max, truncating cast to uint8, grey -> RGB), then the HF ViTImageProcessor
    steps: PIL bilinear resize to 224 x 224 (resample=2), rescale 1/255, ImageNet mean / std, CHW.
    """
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint16)).save(buffer, format="PNG")
    buffer.seek(0)
    with Image.open(buffer) as image:
        array = np.array(ImageOps.exif_transpose(image)).astype(np.float32)
    lo, hi = np.nanmin(array), np.nanmax(array)
    array8 = np.clip((array - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    rgb = Image.fromarray(array8).convert("RGB")
    resized = np.array(rgb.resize((224, 224), resample=2))
    return ((resized.astype(np.float32) / 255.0 - MEAN) / STD).transpose(2, 0, 1)


def test_prepare_array_matches_skelex_path() -> None:
    pixels = synthetic_radiograph(700, 540, seed=11)
    ours = prepare_array(pixels).numpy()
    reference = skelex_reference(pixels)
    assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
    assert np.abs(ours - reference).max() <= 2e-6  # same uint8 resize; float rounding only (7.2e-7 measured)


def test_prepare_array_matches_transformers_vit_image_processor() -> None:
    vit_processing = pytest.importorskip("transformers.models.vit.image_processing_pil_vit")
    processor = vit_processing.ViTImageProcessorPil(
        do_resize=True, size={"height": 224, "width": 224}, resample=2, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
    )
    pixels = synthetic_radiograph(333, 517, seed=12)
    rgb = Image.fromarray(to_uint8_minmax(pixels)).convert("RGB")
    reference = processor(images=rgb, return_tensors="np")["pixel_values"][0]
    assert np.abs(prepare_array(pixels).numpy() - reference).max() <= 1e-5


def test_preprocess_plain_dataset_matches_skelex_on_the_same_pixels() -> None:
    pixels = synthetic_radiograph(400, 300, seed=13)
    result = preprocess(make_dataset(pixels))
    assert result.tensor.shape == (1, 3, 224, 224) and result.tensor.dtype == torch.float32
    assert np.abs(result.tensor[0].numpy() - skelex_reference(pixels)).max() <= 2e-6
    # Three identical channels, each normalised with its own mean / std.
    grey = result.tensor[0].numpy() * STD[:, None, None] + MEAN[:, None, None]
    assert np.abs(grey[0] - grey[1]).max() < 1e-6 and np.abs(grey[0] - grey[2]).max() < 1e-6


def test_to_uint8_minmax_uses_the_full_range_and_handles_constants() -> None:
    out = to_uint8_minmax(np.array([[100, 200], [300, 4095]], dtype=np.uint16))
    assert out.min() == 0 and out.max() == 255 and out.dtype == np.uint8
    assert not to_uint8_minmax(np.full((4, 4), 7.0)).any()


def test_monochrome1_is_inverted() -> None:
    pixels = synthetic_radiograph(300, 260, seed=14)
    mono2 = preprocess(make_dataset(4095 - pixels))
    mono1 = preprocess(make_dataset(pixels, photometric="MONOCHROME1"))
    assert np.abs(mono1.display[0].astype(int) - mono2.display[0].astype(int)).max() <= 1
    assert float((mono1.tensor - mono2.tensor).abs().max()) <= ONE_GREY_LEVEL + 1e-5
    # Low stored values are bright in MONOCHROME1.
    darkest_stored = np.unravel_index(np.argmin(pixels), pixels.shape)
    assert mono1.display[0][darkest_stored] == 255


def _linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 linear VOI function, output 0..1."""
    out = (values - (centre - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0)


def test_modality_lut_runs_before_the_window() -> None:
    pixels = synthetic_radiograph(256, 256, seed=15)
    # Rescaled values are 2 * stored - 1000; the window is expressed in rescaled units.
    ds = make_dataset(pixels, RescaleSlope=2, RescaleIntercept=-1000, RescaleType="US",
                      WindowCenter=3000, WindowWidth=4000)
    display = preprocess(ds, voi="window").display[0]
    expected = to_uint8_minmax(_linear_window(pixels * 2.0 - 1000.0, 3000, 4000))
    assert np.abs(display.astype(int) - expected.astype(int)).max() <= 1
    # Applying the window to stored values would clip a different set of pixels.
    wrong = to_uint8_minmax(_linear_window(pixels.astype(np.float64), 3000, 4000))
    assert np.abs(display.astype(int) - wrong.astype(int)).max() > 10


def test_window_centre_width_and_voi_policies() -> None:
    pixels = synthetic_radiograph(256, 256, seed=16)
    ds = make_dataset(pixels, WindowCenter=[1500, 2500], WindowWidth=[1000, 500])
    windowed = preprocess(ds, voi="auto").display[0]
    expected = to_uint8_minmax(_linear_window(pixels.astype(np.float64), 1500, 1000))  # first window
    assert np.abs(windowed.astype(int) - expected.astype(int)).max() <= 1
    assert np.array_equal(preprocess(ds, voi="window").display[0], windowed)
    raw = to_uint8_minmax(pixels)
    assert np.array_equal(preprocess(ds, voi="none").display[0], raw)
    assert np.array_equal(preprocess(ds, voi="lut").display[0], raw)  # no VOI LUT Sequence: nothing to apply
    with pytest.raises(ValueError):
        preprocess(ds, voi="sometimes")  # type: ignore[arg-type]


def _voi_lut_item(table: np.ndarray, first_mapped: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(table), first_mapped, bits]
    item.LUTData = [int(v) for v in table]
    item["LUTData"].VR = "US"
    return item


def test_voi_lut_sequence_is_preferred_by_auto() -> None:
    pixels = synthetic_radiograph(256, 256, seed=17)
    table = (np.sqrt(np.arange(4096) / 4095.0) * 65535).astype(np.uint16)  # non-linear: not a window
    ds = make_dataset(pixels, WindowCenter=2000, WindowWidth=200)
    ds.VOILUTSequence = [_voi_lut_item(table, 0, 16)]
    expected = to_uint8_minmax(table[pixels].astype(np.float64))
    assert np.abs(preprocess(ds, voi="auto").display[0].astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(preprocess(ds, voi="lut").display[0].astype(int) - expected.astype(int)).max() <= 1
    by_window = to_uint8_minmax(_linear_window(pixels.astype(np.float64), 2000, 200))
    assert np.abs(preprocess(ds, voi="window").display[0].astype(int) - by_window.astype(int)).max() <= 1


def test_enhanced_multiframe_per_frame_window() -> None:
    frames = np.stack([synthetic_radiograph(200, 200, seed=s) for s in (1, 2)])
    ds = make_dataset(frames)
    windows = [(1200, 800), (2600, 600)]
    per_frame = []
    for centre, width in windows:
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = centre, width
        group = Dataset()
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    result = preprocess(ds)
    for index, (centre, width) in enumerate(windows):
        expected = to_uint8_minmax(_linear_window(frames[index].astype(np.float64), centre, width))
        assert np.abs(result.display[index].astype(int) - expected.astype(int)).max() <= 1


def test_rgb_is_converted_to_bt601_luma() -> None:
    rng = np.random.default_rng(18)
    rgb = rng.integers(0, 256, size=(240, 230, 3), dtype=np.uint8)
    result = preprocess(make_dataset(rgb, bits_stored=8, photometric="RGB"))
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.array_equal(result.display[0], to_uint8_minmax(luma))
    assert np.abs(result.tensor[0].numpy() - prepare_array(luma).numpy()).max() == 0


def test_ybr_jpeg_sample_becomes_grey() -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm"))  # YBR_FULL_422 JPEG baseline
    result = preprocess(ds)
    rgb = ds.pixel_array.astype(np.float32)  # pydicom converts YBR to RGB
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert np.abs(result.display[0].astype(int) - to_uint8_minmax(luma).astype(int)).max() <= 1


def test_palette_colour_is_refused() -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    with pytest.raises(PreprocessError, match="PALETTE COLOR"):
        preprocess(ds)


def test_display_is_bounded_and_keeps_aspect() -> None:
    pixels = synthetic_radiograph(900, 600, seed=19)
    result = preprocess(make_dataset(pixels), display_size=300)
    assert result.display[0].shape == (300, 200) and result.display[0].dtype == np.uint8
    full = preprocess(make_dataset(pixels), display_size=None)
    assert full.display[0].shape == (900, 600)
    assert np.array_equal(full.tensor.numpy(), result.tensor.numpy())  # display size never changes the input


def test_geometry_describes_the_source() -> None:
    ds = make_dataset(synthetic_radiograph(320, 240, seed=20))
    ds.PixelSpacing = [0.2, 0.1]
    geometry = preprocess(ds).geometry
    assert (geometry.rows, geometry.columns, geometry.frame_count) == (320, 240, 1)
    assert geometry.pixel_spacing == (0.2, 0.1)
    assert (geometry.decoded_rows, geometry.decoded_columns) == (320, 240)
    del ds.PixelSpacing
    ds.ImagerPixelSpacing = [0.15, 0.15]
    assert preprocess(ds).geometry.pixel_spacing == (0.15, 0.15)


def test_missing_attribute_raises_preprocess_error() -> None:
    ds = make_dataset(synthetic_radiograph(64, 64))
    del ds.BitsAllocated
    with pytest.raises(PreprocessError, match="BitsAllocated"):
        preprocess(ds)


def test_engines_preprocess_is_the_function_even_after_the_submodule_is_imported() -> None:
    import engines
    import engines.imaging.preprocess as module  # the submodule lives under engines.imaging, so nothing shadows

    ds = make_dataset(synthetic_radiograph(128, 128, seed=21))
    expected = module.preprocess(ds).tensor
    assert engines.preprocess is module.preprocess
    assert torch.equal(engines.preprocess(ds).tensor, expected)


def test_modality_lut_sequence_is_applied() -> None:
    pixels = synthetic_radiograph(200, 180, seed=22)
    table = ((np.arange(4096) / 4095.0) ** 2 * 65535).astype(np.uint16)  # non-linear, unlike a rescale
    item = _voi_lut_item(table, 0, 16)
    item.ModalityLUTType = "US"
    ds = make_dataset(pixels)
    ds.ModalityLUTSequence = [item]
    expected = to_uint8_minmax(table[pixels].astype(np.float64))
    display = preprocess(ds, voi="none").display[0]
    assert np.abs(display.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(display.astype(int) - to_uint8_minmax(pixels).astype(int)).max() > 20
