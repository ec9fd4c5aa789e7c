"""tools/install.py: pip's package sources reach uv (as pip itself reports them), bytecode is compiled at install
time, and whatever uv refuses is installed by pip instead."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

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


def hand_made_wheel(folder: Path, name: str) -> Path:
    """A pure-Python wheel with one module, no build step and no dependencies."""
    wheel = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    files = {
        f"{name}.py": "ANSWER = 42\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return wheel


def test_install_compiles_bytecode_and_falls_back_to_pip(tmp_path, capfd):
    venv_dir = tmp_path / "venv"
    first, second = hand_made_wheel(tmp_path, "first_pkg"), hand_made_wheel(tmp_path, "second_pkg")
    assert install(venv_dir, [str(first)]) == 0
    python = str(venv_dir / "bin" / "python")
    assert (
        subprocess.run([python, "-c", "import uv, first_pkg; assert first_pkg.ANSWER == 42"]).returncode == 0
    )
    site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], text=True
        ).strip()
    )
    assert list((site / "__pycache__").glob("first_pkg.*.pyc")), "bytecode was not compiled at install time"
    assert "installing with pip instead" not in capfd.readouterr().err

    # a pip-only flag: uv refuses the command line, pip installs
    assert install(venv_dir, ["--no-warn-script-location", str(second)]) == 0
    assert "installing with pip instead" in capfd.readouterr().err
    assert subprocess.run([python, "-c", "import second_pkg"]).returncode == 0
