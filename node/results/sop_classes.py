"""What the SR builder needs to know about a source's SOP class, from the standard (no private highdicom API).

For every Standard SOP Class with a Composite IOD (PS3.4 Annex B.5 "Standard SOP Classes", with the IODs of
PS3.3 Annex A):

- ``image``: the IOD includes Pixel Data, Float Pixel Data or Double Float Pixel Data (PS3.3 C.7.6.3 Image
  Pixel, C.7.6.3.1.4 / C.7.6.24), not counting icon images (Icon Image Sequence, PS3.3 C.7.6.1.1.6);
- ``multi_frame``: the IOD includes Number of Frames (PS3.3 C.7.6.6 Multi-frame module, or a functional-group
  IOD), i.e. referenced frame numbers are allowed (PS3.3 C.17.3.2.1 Referenced Frame Number);
- ``modality``: the coded acquisition modality of TID 1602 (PS3.16 CID 29 "Acquisition Modality", CID 32
  "Non-Acquisition Modality"), a pydicom ``codes`` name.

The table holds exactly the classes, flags and codes that highdicom 0.28 consults inside its own constructors
(the SR copies the patient and study modules from the IOD of ``evidence[0]``; an image reference refuses frame
numbers for a single-frame IOD). It must keep agreeing with the installed highdicom, or the SR built for a
source would change: ``tests/results/test_sop_classes.py`` compares it with highdicom's own tables.

Two waveform presentation-state classes (``UNDESCRIBED``) have an IOD but no module description in highdicom
0.28: they count as "not an image", and whether they are multi-frame is unknown (``KeyError``), as in highdicom.
"""

from __future__ import annotations

from typing import NamedTuple

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

# (image, multi_frame); multi_frame None: not known
IMAGE = (True, False)
IMAGE_MF = (True, True)
FRAMES = (False, True)  # multi-frame IOD without pixel data (e.g. parametric and encapsulated data)
OTHER = (False, False)
UNDESCRIBED = (False, None)


class SopClass(NamedTuple):
    image: bool
    multi_frame: bool | None
    modality: Code | None


# SOP Class UID: (kind, coded modality as "cidNN.Keyword" in pydicom.sr.codedict.codes)
_TABLE: dict[str, tuple[tuple[bool, bool | None], str | None]] = {
    "1.2.840.10008.1.3.10": (OTHER, None),  # Media Storage Directory Storage
    "1.2.840.10008.5.1.4.1.1.1": (IMAGE, "cid29.ComputedRadiography"),  # Computed Radiography Image Storage
    # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1": (IMAGE, "cid29.DigitalRadiography"),
    # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.1.1": (IMAGE, "cid29.DigitalRadiography"),
    # Digital Mammography X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.2": (IMAGE, "cid29.Mammography"),
    # Digital Mammography X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1": (IMAGE, "cid29.Mammography"),
    # Digital Intra-Oral X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.3": (IMAGE, "cid29.IntraOralRadiography"),
    # Digital Intra-Oral X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1": (IMAGE, "cid29.IntraOralRadiography"),
    "1.2.840.10008.5.1.4.1.1.2": (IMAGE, "cid29.ComputedTomography"),  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1": (IMAGE_MF, "cid29.ComputedTomography"),  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2": (IMAGE_MF, "cid29.ComputedTomography"),  # Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.3.1": (IMAGE_MF, "cid29.Ultrasound"),  # Ultrasound Multi-frame Image Storage
    "1.2.840.10008.5.1.4.1.1.4": (IMAGE, "cid29.MagneticResonance"),  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1": (IMAGE_MF, "cid29.MagneticResonance"),  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.2": (FRAMES, "cid29.MagneticResonance"),  # MR Spectroscopy Storage
    "1.2.840.10008.5.1.4.1.1.4.3": (IMAGE_MF, "cid29.MagneticResonance"),  # Enhanced MR Color Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4": (IMAGE_MF, "cid29.MagneticResonance"),  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.6.1": (IMAGE, "cid29.Ultrasound"),  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.6.2": (IMAGE_MF, "cid29.Ultrasound"),  # Enhanced US Volume Storage
    "1.2.840.10008.5.1.4.1.1.6.3": (IMAGE_MF, None),  # Photoacoustic Image Storage
    "1.2.840.10008.5.1.4.1.1.7": (IMAGE, "cid32.Other"),  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.1": (IMAGE_MF, "cid32.Other"),  # Multi-frame Single Bit Secondary Capture Image Storage
    # Multi-frame Grayscale Byte Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.2": (IMAGE_MF, "cid32.Other"),
    # Multi-frame Grayscale Word Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.7.3": (IMAGE_MF, "cid32.Other"),
    "1.2.840.10008.5.1.4.1.1.7.4": (IMAGE_MF, "cid32.Other"),  # Multi-frame True Color Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.9.1.1": (OTHER, "cid29.Electrocardiography"),  # 12-lead ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.2": (OTHER, "cid29.Electrocardiography"),  # General ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.3": (OTHER, "cid29.Electrocardiography"),  # Ambulatory ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.4": (OTHER, None),  # General 32-bit ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.2.1": (OTHER, "cid29.HemodynamicWaveform"),  # Hemodynamic Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.3.1": (OTHER, "cid29.Electrocardiography"),  # Cardiac Electrophysiology Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.4.1": (OTHER, "cid32.BasicVoiceAudio"),  # Basic Voice Audio Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.4.2": (OTHER, None),  # General Audio Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.5.1": (OTHER, "cid29.HemodynamicWaveform"),  # Arterial Pulse Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.6.1": (OTHER, "cid29.RespiratoryWaveform"),  # Respiratory Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.6.2": (OTHER, None),  # Multi-channel Respiratory Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.1": (OTHER, None),  # Routine Scalp Electroencephalogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.2": (OTHER, None),  # Electromyogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.3": (OTHER, None),  # Electrooculogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.7.4": (OTHER, None),  # Sleep Electroencephalogram Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.8.1": (OTHER, None),  # Body Position Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.100.1": (UNDESCRIBED, None),  # waveform-presentation-state
    "1.2.840.10008.5.1.4.1.1.9.100.2": (UNDESCRIBED, None),  # waveform-acquisition-presentation-state
    "1.2.840.10008.5.1.4.1.1.11.1": (OTHER, "cid32.PresentationState"),  # Grayscale Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.2": (OTHER, "cid32.PresentationState"),  # Color Softcopy Presentation State Storage
    # Pseudo-Color Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.3": (OTHER, "cid32.PresentationState"),
    "1.2.840.10008.5.1.4.1.1.11.4": (OTHER, "cid32.PresentationState"),  # Blending Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.5": (OTHER, None),  # XA/XRF Grayscale Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.6": (OTHER, None),  # Grayscale Planar MPR Volumetric Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.7": (OTHER, None),  # Compositing Planar MPR Volumetric Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.8": (OTHER, None),  # Advanced Blending Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.9": (OTHER, None),  # Volume Rendering Volumetric Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.10": (OTHER, None),  # Segmented Volume Rendering Volumetric Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.11": (OTHER, None),  # Multiple Volume Rendering Volumetric Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.11.12": (OTHER, None),  # Variable Modality LUT Softcopy Presentation State Storage
    "1.2.840.10008.5.1.4.1.1.12.1": (IMAGE_MF, "cid29.XRayAngiography"),  # X-Ray Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.1.1": (IMAGE_MF, "cid29.XRayAngiography"),  # Enhanced XA Image Storage
    "1.2.840.10008.5.1.4.1.1.12.2": (IMAGE_MF, "cid29.Radiofluoroscopy"),  # X-Ray Radiofluoroscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.2.1": (IMAGE_MF, "cid29.Radiofluoroscopy"),  # Enhanced XRF Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.1": (IMAGE_MF, "cid29.XRayAngiography"),  # X-Ray 3D Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.2": (IMAGE_MF, "cid29.DigitalRadiography"),  # X-Ray 3D Craniofacial Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.3": (IMAGE_MF, "cid29.Mammography"),  # Breast Tomosynthesis Image Storage
    "1.2.840.10008.5.1.4.1.1.13.1.4": (IMAGE_MF, None),  # Breast Projection X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.13.1.5": (IMAGE_MF, None),  # Breast Projection X-Ray Image Storage - For Processing
    # Intravascular Optical Coherence Tomography Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.14.1": (IMAGE_MF, "cid29.IntravascularOpticalCoherenceTomography"),
    # Intravascular Optical Coherence Tomography Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.14.2": (IMAGE_MF, "cid29.IntravascularOpticalCoherenceTomography"),
    "1.2.840.10008.5.1.4.1.1.20": (IMAGE_MF, "cid29.NuclearMedicine"),  # Nuclear Medicine Image Storage
    "1.2.840.10008.5.1.4.1.1.30": (IMAGE_MF, None),  # Parametric Map Storage
    "1.2.840.10008.5.1.4.1.1.66": (OTHER, None),  # Raw Data Storage
    "1.2.840.10008.5.1.4.1.1.66.1": (OTHER, "cid32.Registration"),  # Spatial Registration Storage
    "1.2.840.10008.5.1.4.1.1.66.2": (OTHER, "cid32.SpatialFiducialsProducer"),  # Spatial Fiducials Storage
    "1.2.840.10008.5.1.4.1.1.66.3": (OTHER, "cid32.Registration"),  # Deformable Spatial Registration Storage
    "1.2.840.10008.5.1.4.1.1.66.4": (IMAGE_MF, "cid32.Segmentation"),  # Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.5": (OTHER, None),  # Surface Segmentation Storage
    "1.2.840.10008.5.1.4.1.1.66.6": (OTHER, None),  # Tractography Results Storage
    "1.2.840.10008.5.1.4.1.1.66.7": (IMAGE_MF, "cid32.Segmentation"),  # segmentation
    "1.2.840.10008.5.1.4.1.1.66.8": (IMAGE_MF, None),  # height-map-segmentation
    "1.2.840.10008.5.1.4.1.1.67": (OTHER, "cid32.RealWorldValueMap"),  # Real World Value Mapping Storage
    "1.2.840.10008.5.1.4.1.1.68.1": (OTHER, "cid29.OpticalSurfaceScanner"),  # Surface Scan Mesh Storage
    "1.2.840.10008.5.1.4.1.1.68.2": (OTHER, "cid29.OpticalSurfaceScanner"),  # Surface Scan Point Cloud Storage
    "1.2.840.10008.5.1.4.1.1.77.1.1": (IMAGE, "cid29.Endoscopy"),  # VL Endoscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": (IMAGE_MF, "cid29.Endoscopy"),  # Video Endoscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.2": (IMAGE, "cid29.GeneralMicroscopy"),  # VL Microscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.2.1": (IMAGE_MF, "cid29.GeneralMicroscopy"),  # Video Microscopic Image Storage
    # VL Slide-Coordinates Microscopic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.3": (IMAGE, "cid29.SlideMicroscopy"),
    "1.2.840.10008.5.1.4.1.1.77.1.4": (IMAGE, "cid29.ExternalCameraPhotography"),  # VL Photographic Image Storage
    # Video Photographic Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.4.1": (IMAGE_MF, "cid29.ExternalCameraPhotography"),
    # Ophthalmic Photography 8 Bit Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.1": (IMAGE_MF, "cid29.OphthalmicPhotography"),
    # Ophthalmic Photography 16 Bit Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.2": (IMAGE_MF, "cid29.OphthalmicPhotography"),
    "1.2.840.10008.5.1.4.1.1.77.1.5.3": (OTHER, "cid32.StereometricRelationship"),  # Stereometric Relationship Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.4": (IMAGE_MF, "cid29.OphthalmicTomography"),  # Ophthalmic Tomography Image Storage
    # Wide Field Ophthalmic Photography Stereographic Projection Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.5": (IMAGE_MF, None),
    # Wide Field Ophthalmic Photography 3D Coordinates Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.6": (IMAGE_MF, None),
    "1.2.840.10008.5.1.4.1.1.77.1.5.7": (IMAGE, None),  # Ophthalmic Optical Coherence Tomography En Face Image Storage
    # Ophthalmic Optical Coherence Tomography B-scan Volume Analysis Storage
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": (IMAGE_MF, None),
    "1.2.840.10008.5.1.4.1.1.77.1.6": (IMAGE_MF, "cid29.SlideMicroscopy"),  # VL Whole Slide Microscopy Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.7": (IMAGE, None),  # Dermoscopic Photography Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.8": (IMAGE_MF, None),  # Confocal Microscopy Image Storage
    "1.2.840.10008.5.1.4.1.1.77.1.9": (IMAGE_MF, None),  # Confocal Microscopy Tiled Pyramidal Image Storage
    "1.2.840.10008.5.1.4.1.1.78.1": (OTHER, "cid29.Lensometry"),  # Lensometry Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.2": (OTHER, "cid29.Autorefraction"),  # Autorefraction Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.3": (OTHER, "cid29.Keratometry"),  # Keratometry Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.4": (OTHER, "cid29.SubjectiveRefraction"),  # Subjective Refraction Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.5": (OTHER, "cid29.VisualAcuity"),  # Visual Acuity Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.6": (OTHER, None),  # Spectacle Prescription Report Storage
    # Ophthalmic Axial Measurements Storage
    "1.2.840.10008.5.1.4.1.1.78.7": (OTHER, "cid29.OphthalmicAxialMeasurements"),
    # Intraocular Lens Calculations Storage
    "1.2.840.10008.5.1.4.1.1.78.8": (OTHER, "cid32.IntraocularLensCalculation"),
    "1.2.840.10008.5.1.4.1.1.79.1": (OTHER, None),  # Macular Grid Thickness and Volume Report Storage
    # Ophthalmic Visual Field Static Perimetry Measurements Storage
    "1.2.840.10008.5.1.4.1.1.80.1": (OTHER, "cid29.OphthalmicVisualField"),
    "1.2.840.10008.5.1.4.1.1.81.1": (IMAGE, "cid29.OphthalmicMapping"),  # Ophthalmic Thickness Map Storage
    "1.2.840.10008.5.1.4.1.1.82.1": (IMAGE, "cid29.OphthalmicMapping"),  # Corneal Topography Map Storage
    "1.2.840.10008.5.1.4.1.1.88.11": (OTHER, "cid32.StructuredReportDocument"),  # Basic Text SR Storage
    "1.2.840.10008.5.1.4.1.1.88.22": (OTHER, "cid32.StructuredReportDocument"),  # Enhanced SR Storage
    "1.2.840.10008.5.1.4.1.1.88.33": (OTHER, "cid32.StructuredReportDocument"),  # Comprehensive SR Storage
    "1.2.840.10008.5.1.4.1.1.88.34": (OTHER, "cid32.StructuredReportDocument"),  # Comprehensive 3D SR Storage
    "1.2.840.10008.5.1.4.1.1.88.35": (OTHER, "cid32.StructuredReportDocument"),  # Extensible SR Storage
    "1.2.840.10008.5.1.4.1.1.88.40": (OTHER, None),  # Procedure Log Storage
    "1.2.840.10008.5.1.4.1.1.88.50": (OTHER, "cid32.StructuredReportDocument"),  # Mammography CAD SR Storage
    "1.2.840.10008.5.1.4.1.1.88.59": (OTHER, "cid32.KeyObjectSelection"),  # Key Object Selection Document Storage
    "1.2.840.10008.5.1.4.1.1.88.65": (OTHER, "cid32.StructuredReportDocument"),  # Chest CAD SR Storage
    "1.2.840.10008.5.1.4.1.1.88.67": (OTHER, "cid32.StructuredReportDocument"),  # X-Ray Radiation Dose SR Storage
    # Radiopharmaceutical Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.88.68": (OTHER, "cid32.StructuredReportDocument"),
    "1.2.840.10008.5.1.4.1.1.88.69": (OTHER, None),  # Colon CAD SR Storage
    "1.2.840.10008.5.1.4.1.1.88.70": (OTHER, "cid32.StructuredReportDocument"),  # Implantation Plan SR Storage
    "1.2.840.10008.5.1.4.1.1.88.71": (OTHER, "cid32.StructuredReportDocument"),  # Acquisition Context SR Storage
    "1.2.840.10008.5.1.4.1.1.88.72": (OTHER, "cid32.StructuredReportDocument"),  # Simplified Adult Echo SR Storage
    "1.2.840.10008.5.1.4.1.1.88.73": (OTHER, "cid32.StructuredReportDocument"),  # Patient Radiation Dose SR Storage
    # Planned Imaging Agent Administration SR Storage
    "1.2.840.10008.5.1.4.1.1.88.74": (OTHER, "cid32.StructuredReportDocument"),
    # Performed Imaging Agent Administration SR Storage
    "1.2.840.10008.5.1.4.1.1.88.75": (OTHER, "cid32.StructuredReportDocument"),
    # Enhanced X-Ray Radiation Dose SR Storage
    "1.2.840.10008.5.1.4.1.1.88.76": (OTHER, "cid32.StructuredReportDocument"),
    "1.2.840.10008.5.1.4.1.1.88.77": (OTHER, None),  # Waveform Annotation SR Storage
    "1.2.840.10008.5.1.4.1.1.90.1": (OTHER, "cid32.ContentAssessmentResult"),  # Content Assessment Results Storage
    "1.2.840.10008.5.1.4.1.1.91.1": (OTHER, None),  # Microscopy Bulk Simple Annotations Storage
    "1.2.840.10008.5.1.4.1.1.104.1": (OTHER, None),  # Encapsulated PDF Storage
    "1.2.840.10008.5.1.4.1.1.104.2": (OTHER, None),  # Encapsulated CDA Storage
    "1.2.840.10008.5.1.4.1.1.104.3": (OTHER, None),  # Encapsulated STL Storage
    "1.2.840.10008.5.1.4.1.1.104.4": (OTHER, None),  # Encapsulated OBJ Storage
    "1.2.840.10008.5.1.4.1.1.104.5": (OTHER, None),  # Encapsulated MTL Storage
    # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.128": (IMAGE, "cid29.PositronEmissionTomography"),
    # Legacy Converted Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.128.1": (IMAGE_MF, "cid29.PositronEmissionTomography"),
    "1.2.840.10008.5.1.4.1.1.130": (IMAGE_MF, "cid29.PositronEmissionTomography"),  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.131": (OTHER, None),  # Basic Structured Display Storage
    "1.2.840.10008.5.1.4.1.1.200.1": (OTHER, None),  # CT Defined Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.200.2": (OTHER, "cid32.CTProtocol"),  # CT Performed Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.200.3": (OTHER, None),  # Protocol Approval Storage
    "1.2.840.10008.5.1.4.1.1.200.7": (OTHER, None),  # XA Defined Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.200.8": (OTHER, None),  # XA Performed Procedure Protocol Storage
    "1.2.840.10008.5.1.4.1.1.201.1": (FRAMES, None),  # Inventory Storage
    "1.2.840.10008.5.1.4.1.1.481.1": (IMAGE_MF, "cid29.RTImage"),  # RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.2": (IMAGE_MF, "cid32.RTDose"),  # RT Dose Storage
    "1.2.840.10008.5.1.4.1.1.481.3": (FRAMES, "cid32.RTStructureSet"),  # RT Structure Set Storage
    "1.2.840.10008.5.1.4.1.1.481.4": (OTHER, "cid32.RTTreatmentRecord"),  # RT Beams Treatment Record Storage
    "1.2.840.10008.5.1.4.1.1.481.5": (OTHER, "cid32.RTPlan"),  # RT Plan Storage
    "1.2.840.10008.5.1.4.1.1.481.6": (OTHER, "cid32.RTTreatmentRecord"),  # RT Brachy Treatment Record Storage
    "1.2.840.10008.5.1.4.1.1.481.7": (OTHER, "cid32.RTTreatmentRecord"),  # RT Treatment Summary Record Storage
    "1.2.840.10008.5.1.4.1.1.481.8": (OTHER, "cid32.RTPlan"),  # RT Ion Plan Storage
    "1.2.840.10008.5.1.4.1.1.481.9": (OTHER, "cid32.RTTreatmentRecord"),  # RT Ion Beams Treatment Record Storage
    "1.2.840.10008.5.1.4.1.1.481.10": (OTHER, None),  # RT Physician Intent Storage
    "1.2.840.10008.5.1.4.1.1.481.11": (OTHER, None),  # RT Segment Annotation Storage
    "1.2.840.10008.5.1.4.1.1.481.12": (OTHER, None),  # RT Radiation Set Storage
    "1.2.840.10008.5.1.4.1.1.481.13": (OTHER, None),  # C-Arm Photon-Electron Radiation Storage
    "1.2.840.10008.5.1.4.1.1.481.14": (OTHER, None),  # Tomotherapeutic Radiation Storage
    "1.2.840.10008.5.1.4.1.1.481.15": (OTHER, None),  # Robotic-Arm Radiation Storage
    "1.2.840.10008.5.1.4.1.1.481.16": (OTHER, None),  # RT Radiation Record Set Storage
    "1.2.840.10008.5.1.4.1.1.481.17": (OTHER, None),  # RT Radiation Salvage Record Storage
    "1.2.840.10008.5.1.4.1.1.481.18": (OTHER, None),  # Tomotherapeutic Radiation Record Storage
    "1.2.840.10008.5.1.4.1.1.481.19": (OTHER, None),  # C-Arm Photon-Electron Radiation Record Storage
    "1.2.840.10008.5.1.4.1.1.481.20": (OTHER, None),  # Robotic Radiation Record Storage
    "1.2.840.10008.5.1.4.1.1.481.21": (OTHER, None),  # RT Radiation Set Delivery Instruction Storage
    "1.2.840.10008.5.1.4.1.1.481.22": (OTHER, None),  # RT Treatment Preparation Storage
    "1.2.840.10008.5.1.4.1.1.481.23": (IMAGE_MF, None),  # Enhanced RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.24": (IMAGE_MF, None),  # Enhanced Continuous RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.25": (OTHER, None),  # RT Patient Position Acquisition Instruction Storage
    "1.2.840.10008.5.1.4.34.7": (OTHER, None),  # RT Beams Delivery Instruction Storage
    "1.2.840.10008.5.1.4.34.10": (OTHER, None),  # RT Brachy Application Setup Delivery Instruction Storage
    "1.2.840.10008.5.1.4.38.1": (OTHER, None),  # Hanging Protocol Storage
    "1.2.840.10008.5.1.4.39.1": (OTHER, None),  # Color Palette Storage
    "1.2.840.10008.5.1.4.43.1": (OTHER, None),  # Generic Implant Template Storage
    "1.2.840.10008.5.1.4.44.1": (OTHER, None),  # Implant Assembly Template Storage
    "1.2.840.10008.5.1.4.45.1": (OTHER, None),  # Implant Template Group Storage
}


def _code(name: str | None) -> Code | None:
    if name is None:
        return None
    cid, keyword = name.split(".")
    return getattr(getattr(codes, cid), keyword)


STANDARD_SOP_CLASSES: dict[str, SopClass] = {
    uid: SopClass(image, multi_frame, _code(modality)) for uid, ((image, multi_frame), modality) in _TABLE.items()
}


def has_standard_iod(sop_class_uid: str) -> bool:
    """Whether the class is a Standard SOP Class with a Composite IOD (private and unknown classes are not)."""
    return str(sop_class_uid) in STANDARD_SOP_CLASSES


def is_image_class(sop_class_uid: str) -> bool:
    """Whether the class's IOD has pixel data; private, unknown and undescribed classes count as not an image."""
    entry = STANDARD_SOP_CLASSES.get(str(sop_class_uid))
    return entry is not None and entry.image


def is_multi_frame_class(sop_class_uid: str) -> bool:
    """Whether the class's IOD allows several frames (not whether an instance has several). ``KeyError`` for a
    class whose IOD is not known here."""
    entry = STANDARD_SOP_CLASSES.get(str(sop_class_uid))
    if entry is None or entry.multi_frame is None:
        raise KeyError(f"no IOD description for SOP Class UID {sop_class_uid}")
    return entry.multi_frame


def coded_modality(sop_class_uid: str) -> Code | None:
    """The TID 1602 Modality code (CID 29 / CID 32) of the class, or None where the standard gives none here."""
    entry = STANDARD_SOP_CLASSES.get(str(sop_class_uid))
    return entry.modality if entry is not None else None
