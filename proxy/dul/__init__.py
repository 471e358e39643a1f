"""DICOM Upper Layer (PS3.8) codec, sans-I/O: bytes in, values and bytes out."""
