"""Innermost loops of a SASS listing, shared by `tools/ncu_stalls.py` (Nsight Compute's source page) and
`tools/gluon_build_check.py` (cuobjdump of a build)."""
from __future__ import annotations

import re

_BRANCH = re.compile(r"\bBRA\s+0x([0-9a-f]+)")  # SASS prints branch targets as addresses


def innermost_loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(first, last address) of each innermost loop in code, [(address, instruction)] in address order: a branch
    back to an instruction of the listing, with no other such body inside it."""
    addresses = {address for address, _ in code}
    bodies = []
    for address, text in code:
        branch = _BRANCH.search(text)
        target = int(branch.group(1), 16) if branch else None
        if target is not None and target < address and target in addresses:
            bodies.append((target, address))
    return [(a, b) for a, b in bodies if not any(a <= c < d <= b and (c, d) != (a, b) for c, d in bodies)]
