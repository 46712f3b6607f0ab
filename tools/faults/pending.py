"""Cases promised by the reliability issue that wait for other work to land; listed, never faked.

Each is a `Case` with `run=None`: the table shows it as "not yet run" with the reason. None is waiting now.
"""
from __future__ import annotations

from faults.common import Case

PENDING: list[Case] = []
