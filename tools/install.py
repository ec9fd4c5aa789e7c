"""Install packages into the project's virtual environment with uv, or with pip where uv cannot.

Why: pip was the slowest step of a fresh clone's `make demo` (90 s of 623 s on the 2-CPU machine, one download and
one unpack at a time); uv resolves, downloads, unpacks and compiles in parallel. uv reads none of pip's
configuration, and pip's configuration is where a machine says where its packages lie (this one keeps its CPU torch
in a find-links folder and caps torch with a constraint file; without them uv would fetch PyPI's CUDA torch), so
those settings are read from `pip config list` and passed on. Bytecode is compiled at install time, as pip does:
with PYTHONDONTWRITEBYTECODE set, nothing would compile it later and every Ray worker would parse torch from source.

Standard library only: it runs before the environment has anything in it.

usage: python3 tools/install.py VENV PIP_INSTALL_ARGUMENT...   (e.g. .venv "torch==2.13.0" -e ".[dev]")
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import venv
from pathlib import Path
from urllib.parse import urlparse

# pip setting → uv flag, for the settings that say where packages come from
SOURCE_FLAGS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}


def pip_settings(python: str, env: dict[str, str] | None = None) -> dict[str, list[str]]:
    """pip's effective package-source settings (files, then PIP_* variables), each a list of values in order."""
    listed = subprocess.run(
        [python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True, env=env
    ).stdout
    settings: dict[str, list[str]] = {}
    for line in listed.splitlines():
        name, sep, value = line.partition("=")
        key = name.rpartition(".")[2]
        if sep and key in SOURCE_FLAGS:
            for item in ast.literal_eval(value.strip()).split():  # pip prints the value's repr
                if item not in settings.setdefault(key, []):
                    settings[key].append(item)
    return settings


def reachable(location: str) -> bool:
    """pip skips a local index or links folder that does not exist (with a warning); uv stops, so leave it out."""
    parsed = urlparse(location)
    if parsed.scheme in ("http", "https"):
        return True
    return Path(parsed.path if parsed.scheme == "file" else location).exists()


def uv_source_flags(settings: dict[str, list[str]]) -> list[str]:
    flags = []
    for key, flag in SOURCE_FLAGS.items():
        for location in settings.get(key, []):
            if reachable(location):
                flags += [flag, location]
    return flags


def install(venv_dir: Path, arguments: list[str]) -> int:
    if not (venv_dir / "bin" / "python").exists():
        venv.create(venv_dir, with_pip=True)
    python = str(venv_dir / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if subprocess.run([*pip, "uv"]).returncode == 0:
        uv = [python, "-m", "uv", "pip", "install", "-q", "--python", python, "--compile-bytecode"]
        # as pip: the best version on any index (uv's default takes the first index that has the package at all,
        # and this machine's first local index holds an older ray than pyproject.toml pins)
        uv += ["--index-strategy", "unsafe-best-match"]
        if subprocess.run([*uv, *uv_source_flags(pip_settings(python)), *arguments]).returncode == 0:
            return 0
        print("install: uv failed (above); installing with pip instead", file=sys.stderr)
    return subprocess.run([*pip, *arguments]).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.rsplit("\n\n", 1)[1])
    os.environ.setdefault("UV_NO_PROGRESS", "1")
    sys.exit(install(Path(sys.argv[1]), sys.argv[2:]))
