"""dicom-tls-proxy: a transparent, TLS-terminating DICOM Upper Layer proxy."""

__version__ = "0.1.0"
