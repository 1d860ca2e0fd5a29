"""Which calls make the host wait for the GPU during a sampling run: bench/e2e_wan.py under torch's CUDA sync debug
mode, each synchronising place printed once (a Python warning with its file and line). A call that synchronises
once per attention call would show up as a place in bsa_core/ or kernels/ printed while the steps run:

    python3 bench/sync_probe.py [bench/e2e_wan.py's arguments, e.g. --latent 2,60,104 --min-tokens 0 --steps 2]

(torch calls the mode a prototype that does not see every synchronising operation.)
"""
import pathlib
import runpy
import sys
import warnings

import torch

if __name__ == "__main__":
    warnings.simplefilter("default")
    torch.cuda.set_sync_debug_mode("warn")
    script = pathlib.Path(__file__).resolve().parent / "e2e_wan.py"
    sys.argv = [str(script), "--no-attention-share", *sys.argv[1:]]
    runpy.run_path(str(script), run_name="__main__")
