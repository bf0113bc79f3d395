"""Sizes for people and from people: bytes shown in binary units, memory sizes parsed from recipes and flags."""

from __future__ import annotations

import re

from llmctl.errors import LlmctlError


def human_bytes(n: int | None) -> str:
    """Bytes in binary units for people: 512 B, 5.26 MiB, 1.20 GiB."""
    if n is None:
        return "unknown"
    if abs(n) < 1024:
        return f"{n} B"
    value, unit = n / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if abs(value) < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.2f} {unit}"


_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*", re.IGNORECASE)


def parse_memory(text: str | int) -> int:
    """Bytes from an int or a size such as "8GiB", "512MB", "1.5G". KB/MB/GB/TB are decimal
    (10^3...), KiB/MiB/GiB/TiB and the bare letters K/M/G/T binary (2^10..., as docker and
    java read them)."""
    if isinstance(text, bool):
        raise LlmctlError(f"memory size {text!r}: expected bytes or a size such as 8GiB, 512MB, 1.5G.")
    if isinstance(text, int):
        value = text
    else:
        match = _SIZE.fullmatch(str(text))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise LlmctlError(f"memory size {text!r}: expected a number and a unit such as 8GiB, 512MB, 1.5G.")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise LlmctlError(f"memory size {text!r}: must be more than 0 bytes.")
    return value
