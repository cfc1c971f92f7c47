"""PRANCE's stages: the quarter points of the depth, where the selector decides widths
and where token strategies reduce by default. A leaf module, so that ``models`` (the
sub-network space) and ``tokens`` (the reduction blocks) share it without importing each
other."""


def default_stage_starts(depth: int) -> tuple[int, ...]:
    """Four equal stages: (0, 3, 6, 9) for 12 blocks, PRANCE's decision points."""
    return tuple(sorted({round(depth * i / 4) for i in range(4)}))
