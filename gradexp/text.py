"""How gradexp writes a number in words (terminal tables, the diagnosis, progress): torch-free, so that
`gradexp compare` and the CLI's start-up import nothing heavy."""

from __future__ import annotations

import math


def fmt_number(v: float | None, digits: int = 3) -> str:
    """Every number gradexp prints (tables, diagnosis, progress): `digits` significant digits, in
    plain notation from 0.001 to 9999 (0.00170, 2.30, 720) and in Python's exponent notation
    beyond (6.63e-17, 1.30e+04); "-" when missing, "0" for an exact zero."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if v == 0 or math.isinf(v):
        return "0" if v == 0 else ("inf" if v > 0 else "-inf")
    v = float(f"{v:.{digits - 1}e}")  # rounded first: 9999.6 is 1.00e+04, 0.00099996 is 0.00100
    exponent = math.floor(math.log10(abs(v)))
    if -3 <= exponent < 4:
        return f"{v:.{max(digits - 1 - exponent, 0)}f}"
    return f"{v:.{digits - 1}e}"
