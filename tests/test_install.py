"""An installed playattention adds one top-level package, ``toolkit``: the built-ins live at
``toolkit.plugins`` and no top-level ``plugins`` package can collide with anyone else's."""
import shutil
import subprocess
import sys

import pytest

from test_layers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """`pip install --no-deps --target <tmp>` of a copy of the project (setuptools writes build/ beside it)."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"
    source.mkdir()
    for name in ("toolkit", "plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    target = work / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (work / "pip.log").write_text(proc.stdout + proc.stderr)
    return target


def run(site, code: str, cwd):
    # -I would drop PYTHONPATH; -P keeps the current folder off sys.path, so only the install is seen
    return subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})


def test_installing_prints_no_warning_about_the_projects_own_configuration(site):
    """setuptools warned ~90 lines per install: a license table (deprecated), toolkit.assets "would be ignored"."""
    log = (site.parent / "pip.log").read_text()
    assert "arning" not in log and "deprecated" not in log, log
    assert (site / "toolkit" / "assets" / "gpt2" / "encoder.json").is_file()  # the data still ships


def test_the_install_has_no_top_level_plugins_package(site, tmp_path):
    assert sorted(p.name for p in site.iterdir() if not p.name.endswith(".dist-info")) == ["bin", "toolkit"]
    proc = run(site, "import plugins", tmp_path)
    assert proc.returncode == 1 and "No module named 'plugins'" in proc.stderr


def test_the_installed_built_ins_load_as_toolkit_plugins(site, tmp_path):
    proc = run(site, "import toolkit, toolkit.plugin_manager as pm; print(toolkit.__file__); "
                     "print(pm.default_registry().get('attention', 'mha').source.plugin)", tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, plugin = proc.stdout.split()
    assert where.startswith(str(site)) and plugin == "toolkit.plugins.attention"


def test_a_checkout_used_without_installing_finds_its_built_ins(tmp_path):
    """As on a machine that runs the repository with PYTHONPATH=checkout (no install, no editable finder)."""
    import sysconfig

    packages = sysconfig.get_paths()["purelib"]  # torch, attrs, ... but -S skips its .pth files (the editable finder)
    proc = subprocess.run([sys.executable, "-S", "-P", "-c",
                           "import toolkit.plugin_manager as pm; print(pm.default_registry().get('norm', 'rmsnorm').factory)"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={"PYTHONPATH": f"{ROOT}:{packages}", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "toolkit.plugins.impl.norm.RMSNorm" in proc.stdout
