"""BSA algorithm: config, cube layout, selection table, pure-torch reference, public entry point."""
from .attention import bsa_attention, unsupported_reason
from .config import BSAConfig, THRESHOLD_MODES, parse_cube_size
from .cubes import CubeLayout, cube_layout
from .selection import BSASelection, mask_to_index

__all__ = ["BSAConfig", "THRESHOLD_MODES", "parse_cube_size", "CubeLayout", "cube_layout", "BSASelection",
           "mask_to_index", "bsa_attention", "unsupported_reason"]
