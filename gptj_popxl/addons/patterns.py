"""popxl-addons' ``apply_pre_alias_patterns``: graph rewrites the Poplar compiler runs before aliasing."""
from ..backend import IS_CPU

LEVELS = ("no_patterns", "minimal", "default", "all")


def apply_pre_alias_patterns(ir, level: str = "default") -> None:
    """Applies the pre-alias patterns of ``level`` to every graph of ``ir``.

    The CPU runtime runs graphs as built, so there it only checks ``level``; with the SDK it runs
    popart's patterns as popxl-addons does.
    """
    if level not in LEVELS:
        raise ValueError(f"apply_pre_alias_patterns: level must be one of {LEVELS}, got {level!r}")
    if IS_CPU:
        return
    import popart._internal.ir as _ir
    pb_level = {"no_patterns": _ir.patterns.PatternsLevel.NoPatterns, "minimal": _ir.patterns.PatternsLevel.Minimal,
                "default": _ir.patterns.PatternsLevel.Default, "all": _ir.patterns.PatternsLevel.All}[level]
    ir._pb_ir.setPatterns(_ir.patterns.Patterns(pb_level))
    for graph in ir._pb_ir.getAllGraphs():
        ir._pb_ir.applyPreAliasPatterns(graph)
