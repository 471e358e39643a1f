"""Benchmark input files, generated once into bench/out/data/ and reused while their manifest matches.

Every file is a valid Explicit VR Little Endian Part 10 object with random 8-bit pixels: single-frame
Secondary Capture for the small files, Multi-frame Grayscale Byte Secondary Capture for the large ones.
pydicom writes everything up to Pixel Data; the Pixel Data element (always the last one) is appended by
hand in 1 MiB chunks, so a 256 MiB file never sits in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

SC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MF_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
GENERATOR_VERSION = 1
CHUNK = 1 << 20
KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class FileSet:
    """`count` objects of `pixel_bytes` pixel data each, in one directory."""

    name: str
    count: int
    pixel_bytes: int

    @property
    def label(self) -> str:
        size = self.pixel_bytes
        unit = f"{size // MIB} MiB" if size % MIB == 0 else f"{size // KIB} KiB"
        return f"{self.count} x {unit}"


def _geometry(pixel_bytes: int) -> tuple[int, int, int]:
    """(rows, columns, frames) with rows * columns * frames == pixel_bytes."""
    if pixel_bytes <= 4 * MIB:
        columns = 1024 if pixel_bytes % 1024 == 0 else pixel_bytes
        return pixel_bytes // columns, columns, 1
    frame = 1024 * 1024
    if pixel_bytes % frame:
        raise ValueError(f"large objects must be a whole number of MiB, not {pixel_bytes}")
    return 1024, 1024, pixel_bytes // frame


def _header(index: int, pixel_bytes: int, study_uid: str, series_uid: str) -> Dataset:
    rows, columns, frames = _geometry(pixel_bytes)
    sop_class = SC_IMAGE if frames == 1 else MF_BYTE_SC
    sop_instance = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "20240301"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "BENCH0001"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.PatientName = "Bench^Throughput"
    ds.PatientID = "BENCH-0001"
    ds.PatientBirthDate = "19800101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 40.0
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return ds


def write_object(path: Path, index: int, pixel_bytes: int, study_uid: str, series_uid: str) -> int:
    """Write one object, streaming the pixels; returns the file size."""
    if pixel_bytes % 2:
        raise ValueError("pixel data length must be even")
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as fp:
        dcmwrite(fp, _header(index, pixel_bytes, study_uid, series_uid), enforce_file_format=True)
        # (7FE0,0010) OB, explicit VR: tag, VR, 2 reserved bytes, 4-byte length
        fp.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_bytes))
        left = pixel_bytes
        while left:
            n = min(CHUNK, left)
            fp.write(os.urandom(n))
            left -= n
    tmp.replace(path)
    return path.stat().st_size


def _manifest(fs: FileSet) -> dict[str, object]:
    return {"version": GENERATOR_VERSION, "count": fs.count, "pixel_bytes": fs.pixel_bytes}


def ensure(root: Path, fs: FileSet) -> tuple[Path, int]:
    """The directory holding `fs` (generated when missing or stale) and its total size in bytes."""
    directory = root / fs.name
    manifest_path = root / f"{fs.name}.json"  # outside the directory storescu scans
    if manifest_path.exists():
        stored = json.loads(manifest_path.read_text())
        files = sorted(directory.glob("*.dcm"))
        if {k: stored.get(k) for k in _manifest(fs)} == _manifest(fs) and len(files) == fs.count:
            return directory, sum(f.stat().st_size for f in files)
    if directory.exists():
        shutil.rmtree(directory)
    manifest_path.unlink(missing_ok=True)
    directory.mkdir(parents=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    total = 0
    for i in range(fs.count):
        total += write_object(directory / f"obj{i:05d}.dcm", i, fs.pixel_bytes, study_uid, series_uid)
    manifest_path.write_text(json.dumps({**_manifest(fs), "total_bytes": total}, indent=2) + "\n")
    return directory, total
