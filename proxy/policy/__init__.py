"""Association and DIMSE rules: model, loader and evaluation. Pure: no I/O beyond reading rule files."""
