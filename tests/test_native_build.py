"""Where the C++ kernels build: in their own folder, or, where that is read-only (an install into a
system site-packages) or ``$GPTJ_POPXL_KERNEL_CACHE`` is set, in a mirror of the package's C++
sources in the kernel cache (``native.build``)."""
import os
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch

import gptj_popxl
from gptj_popxl.addons.ops import rotary_pos_embed
from gptj_popxl.popxl_cpu import native
from test_rotary import hf_rotary, inputs

PACKAGE = os.path.dirname(os.path.abspath(gptj_popxl.__file__))
ROTARY_SOURCE = os.path.join(os.path.dirname(os.path.abspath(rotary_pos_embed.__file__)), "rotary_embedding.cpp")

SCRIPT = """
import sys, numpy as np
from gptj_popxl.addons.ops.rotary_pos_embed import extension
from gptj_popxl.model.rotary import trig_tables
x, positions = np.load(sys.argv[1]), np.load(sys.argv[2])
sin, cos = trig_tables(40, 8)
out = np.empty_like(x)
extension().rotary_embedding(x, sin, cos, positions, out, 8)
np.save(sys.argv[3], out)
print(extension().__file__)
"""


def _read_only(tree: str) -> None:
    for directory, _, _ in os.walk(tree):
        os.chmod(directory, stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)


def test_a_read_only_package_builds_its_kernels_in_the_cache(tmp_path):
    """A read-only copy of the package (sources only) builds the rotary kernel, whose source includes
    a header of another folder by relative path, into $GPTJ_POPXL_KERNEL_CACHE; its result is checked
    against transformers' rotary embedding. (Root may write a read-only folder: the variable is what
    sends the build to the cache there.)"""
    copy = tmp_path / "site" / "gptj_popxl"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__", ".*"))
    _read_only(copy)
    try:
        x, positions = inputs(0)
        np.save(tmp_path / "x.npy", x)
        np.save(tmp_path / "positions.npy", positions)
        cache = tmp_path / "kernels"
        environment = dict(os.environ, PYTHONPATH=str(copy.parent), GPTJ_POPXL_KERNEL_CACHE=str(cache))
        result = subprocess.run([sys.executable, "-c", SCRIPT, *(str(tmp_path / f) for f in ("x.npy", "positions.npy", "out.npy"))],
                                env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        built = result.stdout.strip().splitlines()[-1]
        assert built.startswith(str(cache / "gptj_popxl-")), built
        assert not [name for _, _, names in os.walk(copy) for name in names if name.endswith(".so")]
        expected = hf_rotary(torch.from_numpy(x), positions, 8).numpy()
        np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6, atol=1e-6)
    finally:
        for directory, _, _ in os.walk(copy):
            os.chmod(directory, 0o755)


def _unwritable_folders(monkeypatch):
    """os.access reports no folder writable (as for a read-only install; root may write any)."""
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK and access(path, mode))


def test_an_unwritable_kernel_folder_is_mirrored_into_the_default_cache(tmp_path, monkeypatch):
    """With no cache configured, a kernel whose folder this process may not write, and that holds no
    current build for this processor, is built from a mirror of every C++ source of the package in
    the user's cache folder; a damaged mirror file is written again. A writable folder builds in place."""
    monkeypatch.delenv(native.CACHE_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    identity = "another processor\n"  # the package's own builds are not for it
    assert native._build_source(ROTARY_SOURCE, "rotary_embedding", identity) == ROTARY_SOURCE
    _unwritable_folders(monkeypatch)
    mirrored = native._build_source(ROTARY_SOURCE, "rotary_embedding", identity)
    (mirror,) = (tmp_path / "gptj-popxl" / "kernels").iterdir()
    assert mirrored == str(mirror / os.path.relpath(ROTARY_SOURCE, PACKAGE))
    sources = {os.path.relpath(os.path.join(d, n), PACKAGE) for d, _, names in os.walk(PACKAGE) for n in names
               if n.endswith((".cpp", ".h")) and not n.startswith(".")}
    copied = {os.path.relpath(os.path.join(d, n), mirror) for d, _, names in os.walk(mirror) for n in names}
    assert "popxl_cpu/kernels/parallel_for.h" in sources and copied == sources
    for relative in sources:
        with open(os.path.join(PACKAGE, relative), "rb") as original, open(mirror / relative, "rb") as copy:
            assert original.read() == copy.read(), relative
        assert stat.S_IMODE(os.stat(mirror / relative).st_mode) == 0o644, relative  # other users of the cache
    (mirror / "popxl_cpu/kernels/parallel_for.h").write_bytes(b"")
    assert native._build_source(ROTARY_SOURCE, "rotary_embedding", identity) == mirrored  # same content, same mirror
    with open(os.path.join(PACKAGE, "popxl_cpu/kernels/parallel_for.h"), "rb") as original:
        assert (mirror / "popxl_cpu/kernels/parallel_for.h").read_bytes() == original.read()
    other = native._build_source(ROTARY_SOURCE, "rotary_embedding", "a third processor\n")
    assert not other.startswith(str(mirror) + os.sep)  # one mirror per processor


def test_a_read_only_folder_with_a_current_build_is_used_in_place(monkeypatch):
    """A read-only install whose kernels were built there for this processor uses those builds."""
    monkeypatch.delenv(native.CACHE_VARIABLE, raising=False)
    rotary_pos_embed.extension()  # built (or found current) in the package's folder
    _unwritable_folders(monkeypatch)
    assert native._build_source(ROTARY_SOURCE, "rotary_embedding", native._cpu_identity()) == ROTARY_SOURCE


def test_an_unwritable_cache_names_the_variable(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(native.CACHE_VARIABLE, str(blocker / "kernels"))
    with pytest.raises(OSError, match=r"the C\+\+ kernel 'rotary_embedding' .* kernel cache .*a-file/kernels "
                                      r"cannot be written.*Set \$GPTJ_POPXL_KERNEL_CACHE"):
        native._build_source(ROTARY_SOURCE, "rotary_embedding", native._cpu_identity())
