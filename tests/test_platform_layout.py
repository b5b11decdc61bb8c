"""The repo's `platform/` folder is `sparta.platform` and never the standard library's `platform`."""

import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = ("import platform, sysconfig; assert platform.__file__.startswith(sysconfig.get_paths()['stdlib']), "
         "platform.__file__; platform.python_version(); import sparta.platform.lm; print('stdlib platform')")


def test_import_platform_under_pytest_is_the_stdlib():
    import platform

    assert platform.__file__.startswith(sysconfig.get_paths()["stdlib"])
    assert callable(platform.machine)


def test_import_platform_with_the_repo_root_first_on_sys_path():
    # `python -c` (like `python -m ...`) puts the working directory first on sys.path.
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stdlib platform" in out.stdout


def test_subpackages_map_to_the_root_folders():
    import sparta.attention
    import sparta.kernels
    import sparta.moe
    import sparta.platform.lm

    for module, folder in [(sparta.moe, "moe"), (sparta.attention, "attention"), (sparta.kernels, "kernels"),
                           (sparta.platform.lm, "platform")]:
        assert Path(module.__file__).resolve().parent == REPO / folder
    assert not (REPO / "platform" / "__init__.py").exists(), "platform/__init__.py would shadow the stdlib"
