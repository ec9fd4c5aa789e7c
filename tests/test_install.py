"""tools/install.py: pip's package sources reach uv (as pip itself reports them), bytecode is compiled at install
time, and whatever uv refuses is installed by pip instead."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tools.install import install, pip_settings, uv_source_flags


def pip_env(**settings: str) -> dict[str, str]:
    """This environment without its own pip settings, no pip configuration file, and `settings` as PIP_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, **settings}


def test_pip_settings_are_what_pip_config_reports(tmp_path):
    links, constraints = tmp_path / "wheels", tmp_path / "constraints.txt"
    env = pip_env(
        PIP_FIND_LINKS=f"{links} /elsewhere",
        PIP_EXTRA_INDEX_URL="https://mirror.example/simple",
        PIP_CONSTRAINT=str(constraints),
        PIP_DEFAULT_TIMEOUT="60",  # not a package source: not passed on
    )
    assert pip_settings(sys.executable, env) == {
        "find-links": [str(links), "/elsewhere"],
        "extra-index-url": ["https://mirror.example/simple"],
        "constraint": [str(constraints)],
    }


def test_pip_settings_from_a_configuration_file_with_multi_line_values(tmp_path):
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nextra-index-url =\n    https://a.example/simple\n    https://b.example/simple\n"
    )
    env = {**pip_env(), "PIP_CONFIG_FILE": str(conf)}
    assert pip_settings(sys.executable, env)["extra-index-url"] == [
        "https://a.example/simple",
        "https://b.example/simple",
    ]


def test_uv_gets_the_reachable_sources_only(tmp_path):
    """pip warns about and skips a local index or links folder that is not there; uv would stop on it."""
    (tmp_path / "wheels").mkdir()
    flags = uv_source_flags(
        {
            "find-links": [str(tmp_path / "wheels"), str(tmp_path / "missing")],
            "extra-index-url": [f"file://{tmp_path}/nothing/simple", "https://mirror.example/simple"],
            "constraint": [str(tmp_path / "wheels")],
        }
    )
    assert flags == [
        "--extra-index-url",
        "https://mirror.example/simple",
        "--find-links",
        str(tmp_path / "wheels"),
        "--constraint",
        str(tmp_path / "wheels"),
    ]


def hand_made_wheel(folder: Path, name: str, version: str = "1.0") -> Path:
    """A pure-Python wheel with one module, no build step and no dependencies."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def simple_index(root: Path, name: str, version: str) -> str:
    """A PEP 503 package index on disk holding one version of `name`; its file:// URL."""
    project = root / "simple" / name.replace("_", "-")  # PEP 503's normalised name
    wheel = hand_made_wheel(project, name, version)
    (project / "index.html").write_text(f'<a href="{wheel.name}">{wheel.name}</a>\n')
    return (root / "simple").as_uri()


def runs(python: str, code: str) -> bool:
    return subprocess.run([python, "-c", code]).returncode == 0


@pytest.fixture(scope="module")
def venv_with_uv(tmp_path_factory) -> Path:
    """A fresh environment with uv and one hand-made wheel, installed by tools/install.py."""
    root = tmp_path_factory.mktemp("install")
    assert install(root / "venv", [str(hand_made_wheel(root, "first_pkg"))]) == 0
    return root / "venv"


def test_install_compiles_bytecode(venv_with_uv, capfd):
    python = str(venv_with_uv / "bin" / "python")
    assert runs(python, "import uv, first_pkg")
    site = subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
    pycache = Path(site.decode().strip()) / "__pycache__"
    assert list(pycache.glob("first_pkg.*.pyc")), "bytecode was not compiled at install time"


def test_install_takes_the_best_version_on_any_index_as_pip_does(venv_with_uv, tmp_path, monkeypatch, capfd):
    """The wanted version is only on the second index: uv's default (first index that has the package) fails."""
    first, second = (simple_index(tmp_path / v, "indexed_pkg", v) for v in ("1.0", "2.0"))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{first} {second}")
    assert install(venv_with_uv, ["indexed_pkg>=2"]) == 0
    assert "installing with pip instead" not in capfd.readouterr().err
    assert runs(
        str(venv_with_uv / "bin" / "python"), "import indexed_pkg; assert indexed_pkg.VERSION == '2.0'"
    )


def test_install_falls_back_to_pip(venv_with_uv, tmp_path, capfd):
    """A pip-only flag: uv refuses the command line, pip installs."""
    wheel = hand_made_wheel(tmp_path, "second_pkg")
    assert install(venv_with_uv, ["--no-warn-script-location", str(wheel)]) == 0
    assert "installing with pip instead" in capfd.readouterr().err
    assert runs(str(venv_with_uv / "bin" / "python"), "import second_pkg")
