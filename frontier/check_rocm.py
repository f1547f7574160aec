"""Start-up check for Frontier: torch must be a ROCm build, of the ROCm the loaded module provides.

pip falls back silently to PyPI's CUDA (or a CPU) build of torch when the ROCm index has no wheel
of the pinned version; such a torch imports fine on a login node and then sees no GPU, or RCCL
never loads. `frontier/env.sh` runs this after activating the environment and stops there with
the message. Exit status 0 when fine, 1 with one line per problem otherwise.

    python frontier/check_rocm.py            # uses the torch of this environment and $ROCM_PATH
"""

from __future__ import annotations

import os
import re
import sys

FIX = ("reinstall torch from PyTorch's ROCm index with the exact local version pinned in "
       "envs/frontier.yaml (e.g. torch==2.13.0+rocm7.2), or `module load` the matching rocm")


def rocm_of_wheel(torch_version: str, hip_version: str | None) -> str | None:
    """"7.2" for torch "2.13.0+rocm7.2" / hip "7.2.41134-..."; None for a CUDA or CPU build."""
    tag = re.search(r"\+rocm(\d+\.\d+)", torch_version)
    if tag:
        return tag[1]
    if hip_version:
        return ".".join(hip_version.split(".")[:2])
    return None


def rocm_of_module(rocm_path: str | None) -> str | None:
    """"7.2" for ROCM_PATH=/opt/rocm-7.2.0 (what `module load rocm/7.2.0` sets); else None."""
    match = re.search(r"rocm[-/](\d+\.\d+)", rocm_path or "")
    return match[1] if match else None


def problems(torch_version: str, hip_version: str | None, rocm_path: str | None) -> list[str]:
    """What is wrong with this torch for Frontier (empty when nothing is)."""
    if not hip_version:
        build = "a CUDA" if "+cu" in torch_version else "a CPU or CUDA"
        return [f"torch {torch_version} is {build} build (torch.version.hip is None): pip did "
                f"not take the ROCm wheel; {FIX}"]
    wheel, module = rocm_of_wheel(torch_version, hip_version), rocm_of_module(rocm_path)
    if module is None:
        return [f"no rocm module loaded (ROCM_PATH={rocm_path!r}); `module load rocm/{wheel}.x`"
                " so RCCL, MIOpen and the aws-ofi-rccl plugin match the wheel's ROCm"]
    if wheel != module:
        return [f"torch {torch_version} is built for ROCm {wheel} but the loaded rocm module "
                f"is {module} (ROCM_PATH={rocm_path}); load rocm/{wheel}.x or {FIX}"]
    return []


def main() -> int:
    try:
        import torch
    except ImportError as err:
        print(f"frontier/check_rocm.py: torch does not import ({err}); build the environment "
              "from envs/frontier.yaml (frontier/README.md)", file=sys.stderr)
        return 1
    found = problems(torch.__version__, torch.version.hip, os.environ.get("ROCM_PATH"))
    for line in found:
        print(f"frontier/check_rocm.py: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
