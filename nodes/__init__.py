"""ComfyUI nodes of the pack; ComfyUI's API is imported here, never by bsa_core."""
from comfy_api.latest import ComfyExtension, io

from .nodes_bsa_attention import BSASparseAttention
from .nodes_bsa_report import BSAReport
from .nodes_prune import ActivationSparsityTEAL, PruneLinears24
from .nodes_riflex import RIFLExExtend
from .nodes_tdq import TDQCalibrate, TDQQuantize


class BSAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [BSASparseAttention, BSAReport, RIFLExExtend, TDQCalibrate, TDQQuantize, PruneLinears24,
                ActivationSparsityTEAL]
