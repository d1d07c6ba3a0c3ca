// Parse a DICOM SR with dcmjs (the library OHIF uses) and walk its TID 1500 measurement groups the way OHIF
// v3.13's cornerstone-dicom-sr extension does (_getMeasurements / _processTID1410Measurement /
// _getCoordsFromSCOORDOrSCOORD3D): groups merged by Tracking Unique Identifier, the first top-level SCOORD is the
// measurement's coordinate, NUMs become "meaning: value unit" labels with 2 decimals.
// Usage: node read_sr_with_dcmjs.mjs file.dcm  -> JSON on stdout.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;
const bytes = readFileSync(process.argv[2]);
const arrayBuffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
const dicomData = DicomMessage.readFile(arrayBuffer);
const sr = DicomMetaDictionary.naturalizeDataset(dicomData.dict);

const asArray = (value) => (value === undefined || value === null ? [] : Array.isArray(value) ? value : [value]);
const codeOf = (item) => asArray(item.ConceptNameCodeSequence)[0] || {};

const root = asArray(sr.ContentSequence);
const measurementsContainer = root.find((item) => codeOf(item).CodeValue === "126010");
const library = root.find((item) => codeOf(item).CodeValue === "111028");
const groups = measurementsContainer
  ? asArray(measurementsContainer.ContentSequence).filter((item) => codeOf(item).CodeValue === "125007")
  : [];

const merged = new Map();
for (const group of groups) {
  const content = asArray(group.ContentSequence);
  const uidItem = content.find((item) => codeOf(item).CodeValue === "112040");
  const uid = uidItem ? uidItem.UID : undefined;
  if (!merged.has(uid)) merged.set(uid, []);
  merged.get(uid).push(...content);
}

const measurements = [];
for (const [uid, content] of merged) {
  const graphic = content.find((item) => item.ValueType === "SCOORD" || item.ValueType === "SCOORD3D");
  const coords = [];
  if (graphic) {
    // OHIF reads graphicItem.ContentSequence?.ReferencedSOPSequence (dcmjs: first item's accessors)
    const selected = graphic.ContentSequence;
    const ref = selected ? selected.ReferencedSOPSequence ?? asArray(selected)[0]?.ReferencedSOPSequence : undefined;
    const refItem = asArray(ref)[0];
    coords.push({
      ValueType: graphic.ValueType,
      GraphicType: graphic.GraphicType,
      points: asArray(graphic.GraphicData).length / 2,
      ReferencedSOPInstanceUID: refItem ? refItem.ReferencedSOPInstanceUID : undefined,
      ReferencedSOPClassUID: refItem ? refItem.ReferencedSOPClassUID : undefined,
    });
  }
  const labels = content
    .filter((item) => item.ValueType === "NUM" && item.MeasuredValueSequence)
    .map((item) => {
      const measured = asArray(item.MeasuredValueSequence)[0];
      const unit = asArray(measured.MeasurementUnitsCodeSequence)[0];
      const value = measured.NumericValue ? Number(measured.NumericValue).toFixed(2) : "";
      return `${codeOf(item).CodeMeaning}: ${value} ${unit.CodeValue}`;
    });
  const tracking = content.find((item) => codeOf(item).CodeValue === "112039");
  measurements.push({ uid, trackingIdentifier: tracking ? tracking.TextValue : undefined, coords, labels });
}

const libraryImages = library
  ? asArray(library.ContentSequence)
      .flatMap((group) => asArray(group.ContentSequence))
      .flatMap((item) => asArray(item.ReferencedSOPSequence))
      .map((ref) => ref.ReferencedSOPInstanceUID)
  : [];

process.stdout.write(
  JSON.stringify({
    sopClassUID: sr.SOPClassUID,
    instanceNumber: sr.InstanceNumber,
    conceptName: codeOf(sr).CodeValue,
    libraryImages,
    measurements,
  }),
);
