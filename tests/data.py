"""Test objects: small distinct CT images, C-FIND identifiers, and one huge file written in a stream.

Byte-level helpers read DICOM Part 10 files without pydicom so that a received file can be compared
with the sent one exactly: the file meta group (0002) differs between writers (storescp adds its own),
the data set that follows is what crossed the network and must be identical.
"""

from __future__ import annotations

import hashlib
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MF_GRAYSCALE_BYTE_SC_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7.2")
PIXEL_DATA_TAG = 0x7FE00010

# Explicit VR with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_CHUNK = 1 << 20


def _base_dataset(sop_class: UID, sop_instance: UID, rng: random.Random, index: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = "20240102"
    ds.StudyTime = f"{rng.randrange(24):02d}{rng.randrange(60):02d}00"
    ds.AccessionNumber = f"ACC{index:06d}"
    ds.PatientName = f"Test^Patient{index:04d}"
    ds.PatientID = f"PID{index:06d}"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyID = f"{index}"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    return ds


def make_ct_dataset(index: int, rng: random.Random, *, study_uid: str | None = None) -> Dataset:
    """A small valid CT image, 16-bit random pixels; sizes vary so some objects span several PDUs.
    Each image is its own study unless ``study_uid`` is given."""
    ds = _base_dataset(CT_IMAGE_STORAGE, generate_uid(), rng, index)
    if study_uid is not None:
        ds.StudyInstanceUID = study_uid
    ds.Modality = "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 1
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    side = (16, 48, 64, 96, 128)[index % 5]
    ds.Rows = side
    ds.Columns = side
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = rng.randbytes(side * side * 2)
    return ds


def write_ct_files(directory: Path, count: int, *, seed: int = 1, study_uid: str | None = None) -> list[Path]:
    """``count`` distinct CT files (unique SOP Instance UIDs) in Explicit VR Little Endian."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        ds = make_ct_dataset(index, rng, study_uid=study_uid)
        path = directory / f"ct{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def make_find_identifiers(count: int, *, seed: int = 2) -> list[Dataset]:
    """STUDY-level C-FIND identifiers with distinct, checkable values (some non-ASCII)."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientName = f"M\u00fcller^J\u00fcrgen{index:03d}"
        ds.PatientID = f"FIND{index:05d}"
        ds.StudyInstanceUID = generate_uid()
        ds.StudyDate = f"2023{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}"
        ds.StudyDescription = f"Study {index} " + "x" * rng.randrange(1, 40)  # no trailing space
        ds.AccessionNumber = f"A{rng.randrange(10**9):09d}"
        ds.ModalitiesInStudy = ["CT", "MR"][: 1 + index % 2]
        ds.NumberOfStudyRelatedInstances = rng.randrange(1, 1000)
        out.append(ds)
    return out


# --------------------------------------------------------------------------- byte-level reading


@dataclass(frozen=True)
class Element:
    tag: int
    vr: bytes
    value_offset: int
    length: int


def _read_exact(fh: BinaryIO, count: int) -> bytes:
    data = fh.read(count)
    if len(data) != count:
        raise ValueError(f"truncated DICOM file at offset {fh.tell()}")
    return data


def iter_explicit_le(fh: BinaryIO, offset: int, *, stop_group: int | None = None) -> Iterator[Element]:
    """Walk top-level Explicit VR Little Endian elements from ``offset`` without reading values.
    Stops at EOF or, with ``stop_group``, at the first element of another group."""
    fh.seek(offset)
    while True:
        start = fh.tell()
        header = fh.read(8)
        if not header:
            return
        if len(header) < 8:
            raise ValueError(f"truncated element header at offset {start}")
        group, elem = struct.unpack("<HH", header[:4])
        if stop_group is not None and group != stop_group:
            fh.seek(start)
            return
        vr = header[4:6]
        if vr in _LONG_VRS:
            length = struct.unpack("<I", _read_exact(fh, 4))[0]
            value_offset = start + 12
        else:
            length = struct.unpack("<H", header[6:8])[0]
            value_offset = start + 8
        if length == 0xFFFFFFFF:
            raise ValueError(f"undefined length at ({group:04X},{elem:04X}) is not supported here")
        yield Element((group << 16) | elem, vr, value_offset, length)
        fh.seek(value_offset + length)


@dataclass(frozen=True)
class PartTen:
    """Where the pieces of a DICOM Part 10 file are."""

    path: Path
    meta: dict[int, bytes]  # file meta elements (group 0002) by tag
    dataset_offset: int
    size: int

    @property
    def transfer_syntax(self) -> str:
        return self.meta[0x00020010].rstrip(b"\0 ").decode("ascii")

    @property
    def sop_class(self) -> str:
        return self.meta[0x00020002].rstrip(b"\0 ").decode("ascii")

    @property
    def sop_instance(self) -> str:
        return self.meta[0x00020003].rstrip(b"\0 ").decode("ascii")


def read_part10(path: Path) -> PartTen:
    with path.open("rb") as fh:
        preamble = fh.read(132)
        if len(preamble) != 132 or preamble[128:] != b"DICM":
            raise ValueError(f"{path} is not a DICOM Part 10 file")
        meta: dict[int, bytes] = {}
        end = 132
        for element in iter_explicit_le(fh, 132, stop_group=0x0002):
            fh.seek(element.value_offset)
            meta[element.tag] = _read_exact(fh, element.length)
            end = element.value_offset + element.length
        size = fh.seek(0, 2)
    return PartTen(path, meta, end, size)


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file (everything after the file meta group)."""
    info = read_part10(path)
    with path.open("rb") as fh:
        fh.seek(info.dataset_offset)
        return fh.read()


def dataset_sha256(path: Path) -> str:
    """SHA-256 of the data set bytes of a Part 10 file, read in chunks (fit for huge files)."""
    info = read_part10(path)
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        fh.seek(info.dataset_offset)
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pixel_data_location(path: Path) -> Element:
    """The top-level (7FE0,0010) element of an Explicit VR LE file, found without reading values."""
    info = read_part10(path)
    if info.transfer_syntax != ExplicitVRLittleEndian:
        raise ValueError(f"{path}: expected Explicit VR Little Endian, got {info.transfer_syntax}")
    with path.open("rb") as fh:
        for element in iter_explicit_le(fh, info.dataset_offset):
            if element.tag == PIXEL_DATA_TAG:
                return element
    raise ValueError(f"{path}: no Pixel Data")


def pixel_data_sha256(path: Path) -> tuple[int, str]:
    """(length, SHA-256) of the Pixel Data value, streamed."""
    element = pixel_data_location(path)
    digest = hashlib.sha256()
    remaining = element.length
    with path.open("rb") as fh:
        fh.seek(element.value_offset)
        while remaining:
            chunk = fh.read(min(_CHUNK, remaining))
            if not chunk:
                raise ValueError(f"{path}: Pixel Data truncated, {remaining} bytes missing")
            digest.update(chunk)
            remaining -= len(chunk)
    return element.length, digest.hexdigest()


# --------------------------------------------------------------------------- one huge object


@dataclass(frozen=True)
class BigObject:
    path: Path
    sop_instance_uid: str
    pixel_length: int
    pixel_sha256: str
    dataset_sha256: str


def write_big_file(path: Path, *, min_bytes: int = 1 << 30, frame_side: int = 1024, seed: int = 3) -> BigObject:
    """A Multi-frame Grayscale Byte Secondary Capture image whose Pixel Data is at least
    ``min_bytes`` long, written in a stream: pydicom writes the header, then the Pixel Data
    element header and the frames are appended one MiB-sized frame at a time.

    Every frame is a rotation of one random block stamped with its frame number, so a relay that
    dropped, repeated or reordered any part would change the hash.
    """
    frame_bytes = frame_side * frame_side
    frames = -(-min_bytes // frame_bytes)
    pixel_length = frames * frame_bytes
    if pixel_length > 0xFFFFFFFE:
        raise ValueError("Pixel Data longer than a 32-bit length allows")

    rng = random.Random(seed)
    sop_instance = generate_uid()
    ds = _base_dataset(MF_GRAYSCALE_BYTE_SC_STORAGE, sop_instance, rng, 0)
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 40
    ds.Rows = frame_side
    ds.Columns = frame_side
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    header_end = path.stat().st_size
    dataset_start = read_part10(path).dataset_offset

    block = rng.randbytes(frame_bytes)
    pixel_digest = hashlib.sha256()
    full_digest = hashlib.sha256()
    element_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, pixel_length)
    with path.open("r+b") as fh:
        fh.seek(dataset_start)
        full_digest.update(_read_exact(fh, header_end - dataset_start))
        fh.write(element_header)
        full_digest.update(element_header)
        for frame in range(frames):
            turn = (frame * 4099) % frame_bytes
            data = frame.to_bytes(8, "little") + (block[turn:] + block[:turn])[8:]
            pixel_digest.update(data)
            full_digest.update(data)
            fh.write(data)
    return BigObject(
        path, str(sop_instance), pixel_length, pixel_digest.hexdigest(), full_digest.hexdigest()
    )
