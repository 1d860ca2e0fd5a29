"""The three ways the pack gets installed: ComfyUI-Manager (requirements.txt into ComfyUI's Python), the
Comfy Registry (pyproject's metadata, checked by the registry's own CLI, comfy-cli), and `pip install .`
(the package comfyui_bsa, usable without ComfyUI)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig
import tomllib

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Linux: torch's CUDA wheels bring triton; a 'triton' requirement would overwrite ROCm's / nightly's own build
PLATFORMS = {"linux": None, "win32": "triton-windows", "darwin": None}


def requirement_lines(path: pathlib.Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def wanted_on(requirements: list[str], platform: str) -> set[str]:
    environment = dict(default_environment(), sys_platform=platform)
    parsed = [Requirement(line) for line in requirements]
    return {r.name for r in parsed if r.marker is None or r.marker.evaluate(environment)}


def test_requirements_are_pyproject_without_torch_and_pick_triton_per_platform():
    manager = requirement_lines(REPO / "requirements.txt")
    declared = PYPROJECT["project"]["dependencies"]
    assert {str(Requirement(r)) for r in manager} == {str(Requirement(r)) for r in declared if Requirement(r).name != "torch"}
    for platform, triton in PLATFORMS.items():
        assert wanted_on(manager, platform) == ({triton} if triton else set()), platform
        assert wanted_on(declared, platform) == {"torch"} | ({triton} if triton else set()), platform


def test_manager_install_changes_nothing_in_a_comfyui_python():
    """ComfyUI-Manager runs pip on requirements.txt inside ComfyUI's Python, which has torch (and on Linux
    torch's triton): pip must find everything there and install nothing, so the user's torch stays."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-",
                             "-r", str(REPO / "requirements.txt")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert [item["metadata"]["name"] for item in report["install"]] == []


def test_registry_validation_passes_without_warnings(tmp_path):
    """`comfy node validate` (what `comfy node publish` runs first) parses pyproject.toml with the registry's
    parser and prints a warning for every field it has to drop; the fields the registry page shows are set."""
    from comfy_cli.registry.config_parser import extract_node_configuration

    comfy = pathlib.Path(sysconfig.get_path("scripts")) / "comfy"
    env = dict(os.environ, HOME=str(tmp_path))  # its config file, not the user's
    result = subprocess.run([str(comfy), "--skip-prompt", "--no-enable-telemetry", "node", "validate"], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "passed" in output, output
    assert "warning" not in output.lower() and "error" not in output.lower(), output

    config = extract_node_configuration(str(REPO / "pyproject.toml"))
    project, comfy_config = config.project, config.tool_comfy
    assert project.name and project.version and project.description and project.urls.repository
    assert project.license.text == "Apache-2.0" and (REPO / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert project.supported_comfyui_version == ">=0.3.64"
    assert set(project.supported_os) and project.supported_accelerators == ["GPU :: NVIDIA CUDA"]
    assert comfy_config.publisher_id and comfy_config.display_name
    # the icon is a file of this repository, at the URL GitHub serves it from
    prefix = project.urls.repository.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/"
    assert comfy_config.icon.startswith(prefix), comfy_config.icon
    from PIL import Image
    with Image.open(REPO / comfy_config.icon[len(prefix):]) as icon:
        assert icon.format == "PNG" and icon.width == icon.height <= 400  # the registry's icon rule


def copy_sources(dest: pathlib.Path) -> pathlib.Path:
    """What an sdist of the pack holds: pyproject, README, LICENSE and the package folders pyproject lists."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "__init__.py"):
        shutil.copy(REPO / name, dest / name)
    for package in PYPROJECT["tool"]["setuptools"]["packages"]:
        if "." in package:
            folder = package.split(".", 1)[1].replace(".", "/")
            shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


INSTALLED_CHECK = """
import sys, torch, torch.nn.functional as F
import comfyui_bsa
from comfyui_bsa import RECOMMENDED, BSAConfig, bsa_attention
from comfyui_bsa.integrations.diffusers_wan import BSAWanAttnProcessor
print("FILE", comfyui_bsa.__file__)
torch.manual_seed(0)
q, k, v = torch.randn(3, 1, 2, 8 * 8 * 8, 16).unbind(0)
dense_config = BSAConfig(keep_ratio=1.0, kv_threshold=1.0, threshold_mode="cumulative")
out, selection = bsa_attention(q, k, v, (8, 8, 8), dense_config)
print("DENSE_ERROR", float((out - F.scaled_dot_product_attention(q, k, v)).abs().max()))
out, selection = bsa_attention(q, k, v, (8, 8, 8), RECOMMENDED)
print("KV_KEPT", selection.kv_count.float().mean().item() / selection.num_cubes)
print("COMFY_IMPORTED", any(name == "comfy" or name.startswith("comfy.") or name == "comfy_api" for name in sys.modules))
"""


def test_pip_install_gives_an_importable_package_that_runs_without_comfyui(tmp_path):
    """`pip install --no-deps .` into a fresh venv (torch borrowed from this one through a .pth file; this
    venv's setuptools builds the wheel, >= 77 through torch's own requirement), then run BSA from the
    installed package in a directory that holds no copy of the sources."""
    source = copy_sources(tmp_path / "source")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = pathlib.Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                       check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed_torch.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                              "--no-build-isolation", str(source)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]
    shutil.rmtree(source)  # the import below must come from the venv

    run = subprocess.run([str(python), "-c", INSTALLED_CHECK], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0, run.stderr[-3000:]
    values = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert pathlib.Path(values["FILE"]).is_relative_to(site), values["FILE"]
    assert float(values["DENSE_ERROR"]) < 1e-5
    assert 0.0 < float(values["KV_KEPT"]) < 1.0
    assert values["COMFY_IMPORTED"] == "False"
    metadata = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.requires('comfyui-bsa'))"],
                              capture_output=True, text=True, check=True).stdout
    assert "triton-windows" in metadata and "sys_platform" in metadata


def test_pack_loads_in_comfyui_without_triton_and_runs_the_reference(tmp_path):
    """macOS or a CPU-only torch has no Triton: ComfyUI's loader still registers every node, and BSA runs the
    pure-PyTorch reference (Triton imported only where kernels run)."""
    from comfy_env import COMFYUI_PATH, require_comfyui
    require_comfyui()
    link = tmp_path / "comfyui-bsa"
    link.symlink_to(REPO, target_is_directory=True)
    script = f"""
import asyncio, sys
sys.modules["triton"] = sys.modules["triton.language"] = None  # import triton raises ImportError
sys.path.insert(0, {str(COMFYUI_PATH)!r})
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
assert asyncio.run(nodes.load_custom_node({str(link)!r}))
assert "BSASparseAttention" in nodes.NODE_CLASS_MAPPINGS and "TDQQuantize" in nodes.NODE_CLASS_MAPPINGS
import torch
bsa_core = next(m for name, m in sys.modules.items() if name.endswith("comfyui-bsa.bsa_core"))
q = torch.randn(1, 2, 320, 64)
out = bsa_core.bsa_attention(q, q, q, (5, 8, 8), bsa_core.BSAConfig(cube_size=(2, 4, 4)))
print("reference ran", tuple(out[0].shape))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            cwd=str(COMFYUI_PATH))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "reference ran (1, 2, 320, 64)" in result.stdout
