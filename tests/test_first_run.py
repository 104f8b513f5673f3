"""First run from a checkout: the loader's fallback to an installed sparge._C,
its messages when nothing (or a stale module) is there, and the one-line
message for a missing matplotlib.

The subprocesses run from a copy of the sparge/ source folder without a
compiled module, as the root of a fresh clone is after `pip install .`. They
run with `python -S` and a PYTHONPATH made of symbolic links to everything in
this interpreter's site-packages except sparge itself (its installs, records
and editable finders), so what they find is only what each test puts there:
an "installed" sparge is a folder laid out as pip leaves one (the compiled
module this test session uses, the Python files, a dist-info record)."""
from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import site
import subprocess
import sys

import pytest
import torch

import sparge
from sparge import _lib

SOURCE = os.path.dirname(os.path.abspath(sparge.__file__))
REPO = os.path.dirname(SOURCE)
DEMO_ARGS = ["demo", "--frames", "2", "--size", "8", "--heads", "2", "--repeats", "1", "--device", "cpu"]


def _copy_sources(dst):
    """dst/sparge: the Python files of the package, no compiled module."""
    shutil.copytree(SOURCE, os.path.join(dst, "sparge"),
                    ignore=shutil.ignore_patterns("__pycache__", "_C*.so", "_C*.pyd", "*.pyc"))
    return dst


@pytest.fixture(scope="module")
def site_without_sparge(tmp_path_factory):
    """A folder of links to this interpreter's site-packages entries, sparge's left out."""
    farm = tmp_path_factory.mktemp("site")
    torch_site = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    dirs = list(site.getsitepackages()) + [site.getusersitepackages(), torch_site]
    for d in dirs:
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            low = name.lower()
            if "sparge" in low or low.endswith(".pth") or os.path.exists(farm / name):
                continue
            os.symlink(os.path.join(d, name), farm / name)
    return str(farm)


def _record_hash(path):
    with open(path, "rb") as f:
        return base64.urlsafe_b64encode(hashlib.sha256(f.read()).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A site folder holding sparge as `pip install .` lays it out: package, compiled module, record."""
    where = tmp_path_factory.mktemp("installed")
    _copy_sources(where)
    so_name = os.path.basename(_lib.EXTENSION_PATH)
    os.symlink(_lib.EXTENSION_PATH, where / "sparge" / so_name)
    info = where / f"sparge-{sparge.__version__}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sparge\nVersion: {sparge.__version__}\n")
    rows = [f"sparge/{so_name},,"]
    for root, _, files in os.walk(where / "sparge"):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                rows.append(f"{os.path.relpath(path, where)},sha256={_record_hash(path)},{os.path.getsize(path)}")
    rows += [f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]
    (info / "RECORD").write_text("\n".join(rows) + "\n")
    return str(where)


def _run(args, cwd, path, timeout=180):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, "-S", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_checkout_root_runs_demo_with_installed_module(tmp_path, installed, site_without_sparge):
    checkout = _copy_sources(tmp_path)
    r = _run(["-m", "sparge", *DEMO_ARGS], checkout, [installed, site_without_sparge])
    assert r.returncode == 0, r.stderr
    assert "sparge demo on cpu" in r.stdout and "density" in r.stdout
    assert "differ" not in r.stderr  # the checkout's files are the installed ones


def test_changed_checkout_warns_and_names_the_files(tmp_path, installed, site_without_sparge):
    checkout = _copy_sources(tmp_path)
    with open(os.path.join(checkout, "sparge", "hilbert.py"), "a") as f:
        f.write("\n# edited after the install\n")
    r = _run(["-m", "sparge", "info"], checkout, [installed, site_without_sparge])
    assert r.returncode == 0, r.stderr
    assert "differ from the installed sparge (hilbert.py)" in r.stderr
    assert "pip install ." in r.stderr
    line = next(x for x in r.stdout.splitlines() if "compiled module" in x)
    assert os.path.join(installed, "sparge") in line and "(the installed sparge's, loaded by path)" in line


def test_stale_installed_module_fails_the_abi_check(tmp_path, installed, site_without_sparge):
    checkout = _copy_sources(tmp_path)
    lib = os.path.join(checkout, "sparge", "_lib.py")
    with open(lib) as f:
        text = f.read()
    newer = _lib.ABI_VERSION + 1
    text, n = re.subn(r"^ABI_VERSION = \d+$", f"ABI_VERSION = {newer}", text, flags=re.M)
    assert n == 1
    with open(lib, "w") as f:
        f.write(text)
    r = _run(["-m", "sparge", "info"], checkout, [installed, site_without_sparge])
    assert r.returncode != 0
    assert f"has ABI version {_lib.ABI_VERSION}" in r.stderr and f"expect {newer}" in r.stderr
    assert "stale" in r.stderr and os.path.join(installed, "sparge") in r.stderr
    assert "Traceback" not in r.stderr  # `python -m sparge` reports it on one line


def test_nothing_built_is_one_line(tmp_path, site_without_sparge):
    checkout = _copy_sources(tmp_path)
    r = _run(["-m", "sparge", *DEMO_ARGS], checkout, [site_without_sparge])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    message = [x for x in _lines(r.stderr) if "sparge._C" in x]
    assert len(message) == 1, r.stderr
    assert "is not built" in message[0] and "pip install ." in message[0] and "build_ext --inplace" in message[0]


def test_missing_matplotlib_is_one_line(tmp_path):
    """`python -m sparge demo --plot` and `calibrate-demo` with matplotlib blocked: one line each, no work."""
    code = ("import sys, runpy; sys.modules['matplotlib'] = None\n"
            "for argv in (['demo', '--plot', 'mask.png'], ['calibrate-demo', '--out', 'cal']):\n"
            "    sys.argv = ['sparge'] + argv\n"
            "    try:\n"
            "        runpy.run_module('sparge', run_name='__main__')\n"
            "    except SystemExit as e:\n"
            "        print('rc', e.code)\n")
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr
    assert _lines(r.stdout) == ["rc 1", "rc 1"]  # nothing ran before the check
    lines = _lines(r.stderr)
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("sparge demo --plot needs matplotlib")
    assert lines[1].startswith("sparge calibrate-demo needs matplotlib")
    for line in lines:
        assert 'pip install "sparge[plot]"' in line and 'pip install ".[plot]"' in line
    assert not os.listdir(tmp_path)  # no plot, no output folder


def test_missing_matplotlib_in_the_api(tmp_path, monkeypatch):
    from sparge import demo, viz

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "sparge[plot]" in viz.matplotlib_missing()
    with pytest.raises(ImportError, match=r'pip install "sparge\[plot\]"'):
        demo.run_demo(plot=str(tmp_path / "mask.png"), T=1, size=4, heads=1, repeats=1, print_fn=lambda *a: None)
    with pytest.raises(ImportError, match=r"sparge\.viz needs matplotlib"):
        viz.plot_block_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool), path=str(tmp_path / "m.png"))
    assert not os.listdir(tmp_path)


def test_readme_demo_command_installs_what_it_uses():
    """The demo command CI runs (the README's, as written) installs the plot extra it needs."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    commands = [line.strip() for line in readme.splitlines() if "python -m sparge demo" in line and "pip install" in line]
    assert commands, "README has no install-and-demo command"
    for command in commands:
        install, _, demo = command.partition("&&")
        if "--plot" in demo:
            assert "[plot]" in install, command
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert "python -m sparge demo" in f.read()  # CI takes the command from README.md
