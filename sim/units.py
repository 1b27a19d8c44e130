"""Unit constants: a literal 1e9 or 1e-3 in a formula says nothing about which unit it converts.

Decimal units, as datasheets and the config's sizes use them (`128GB` is 128e9 bytes; a GB/s link
moves 1e9 bytes a second). Multiply to convert into base units (bytes, seconds, FLOP/s):
`hbm_gb * GB`, `ms * MS`; divide to convert out of them: `nbytes / GB`, `seconds / MS`.
"""
KB = 1e3
MB = 1e6
GB = 1e9
TB = 1e12
MS = 1e-3  # a millisecond, in seconds
US = 1e-6  # a microsecond, in seconds
HOUR = 3600.0  # seconds
TFLOPS = 1e12
