"""Building the C++ kernels for the machine they run on.

The kernels are compiled with ``-march=native`` by cppimport, which rebuilds when the checksum of
a source or of a listed dependency changes, not when the processor does: a checkout or an image
built on one machine would run its cached build on another, and an older processor stops at the
first instruction it lacks (SIGILL). So each kernel lists ``.cpu`` beside its source as a
dependency, and :func:`build` writes this processor's model and features into it first.

cppimport compiles a kernel in its source's folder. Where ``$GPTJ_POPXL_KERNEL_CACHE`` names a
folder, or where the source's folder is not writable (the package installed into a read-only
site-packages, a shared image) and holds no current build for this processor, :func:`build`
compiles a copy instead: the package's C++ sources, mirrored with their relative layout (the
kernels include headers of other folders by relative path) into that folder (by default
``$XDG_CACHE_HOME/gptj-popxl/kernels``, or ``~/.cache/...``), one subfolder per content of the
sources and processor.
"""
import hashlib
import os
import platform
import tempfile

CPU_FILE = ".cpu"
CACHE_VARIABLE = "GPTJ_POPXL_KERNEL_CACHE"
# The tree whose C++ sources a kernel may include: the package (its kernels reach each other's
# headers by relative paths inside it).
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SOURCE_SUFFIXES = (".cpp", ".h")


def _cpu_identity() -> str:
    """This processor's model name and feature flags (the first processor's, from /proc/cpuinfo), or
    what ``platform`` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            first = f.read().split("\n\n", 1)[0]
    except OSError:
        return f"{platform.machine()} {platform.processor()}\n"
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    return "".join(f"{key.strip()}: {fields[key].strip()}\n" for key in fields
                   if key.strip() in ("vendor_id", "cpu family", "model", "model name", "flags"))


def cache_folder() -> str:
    """Where kernels are compiled when not in their own folder (see the module docstring)."""
    configured = os.environ.get(CACHE_VARIABLE)
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gptj-popxl", "kernels")


def _write_atomically(path: str, data: bytes) -> None:
    """``path`` holds ``data`` (readable by all), replaced in one step: another process reads the old
    file or the new, never a part."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handle, scratch = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".partial-")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(scratch, 0o644)  # mkstemp's 0600 would shut out other users of a shared cache
        os.replace(scratch, path)
    except BaseException:
        os.unlink(scratch)
        raise


def _read(path: str):
    """The bytes of ``path``, or None when there is no such file."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _built_in_place(source: str, module_name: str, identity: str) -> bool:
    """Whether ``source``'s folder holds cppimport's build of it, current and for this processor."""
    from cppimport.importer import is_build_needed, setup_module_data
    recorded = _read(os.path.join(os.path.dirname(source), CPU_FILE))
    return recorded == identity.encode() and not is_build_needed(setup_module_data(module_name, source))


def _mirrored(source: str, identity: str) -> str:
    """The same file as ``source`` in a mirror of the C++ sources of the tree it belongs to (the
    package, or its own folder outside it) under :func:`cache_folder`, for this processor."""
    folder = os.path.dirname(source)
    root = PACKAGE if os.path.commonpath([PACKAGE, folder]) == PACKAGE else folder
    files = {}
    for directory, _, names in os.walk(root):
        for name in sorted(names):
            if name.endswith(_SOURCE_SUFFIXES) and not name.startswith("."):  # not cppimport's renderings
                path = os.path.join(directory, name)
                files[os.path.relpath(path, root)] = _read(path)
    digest = hashlib.sha256(identity.encode())  # machines sharing a cache build apart
    for relative in sorted(files):
        digest.update(relative.encode() + b"\0" + files[relative] + b"\0")
    mirror = os.path.join(cache_folder(), f"{os.path.basename(root)}-{digest.hexdigest()[:16]}")
    for relative, data in files.items():
        target = os.path.join(mirror, relative)
        if _read(target) != data:  # new, or damaged since
            _write_atomically(target, data)
    return os.path.join(mirror, os.path.relpath(source, root))


def _build_source(source: str, module_name: str, identity: str) -> str:
    """The file cppimport builds for ``source``: itself, or its mirror (see the module docstring)."""
    source = os.path.abspath(source)
    if not os.environ.get(CACHE_VARIABLE) and (os.access(os.path.dirname(source), os.W_OK)
                                               or _built_in_place(source, module_name, identity)):
        return source
    try:
        return _mirrored(source, identity)
    except OSError as e:
        raise OSError(f"the C++ kernel {module_name!r} must be built from a copy of its sources (its folder "
                      f"{os.path.dirname(source)} is read-only or ${CACHE_VARIABLE} is set), but the kernel "
                      f"cache {cache_folder()} cannot be written: {e}. Set ${CACHE_VARIABLE} to a writable "
                      f"folder.") from e


def build(source: str, module_name: str):
    """The extension module of the C++ ``source`` (listing ``.cpu`` among its dependencies), built by
    cppimport for this processor: rebuilt when the processor differs from the one it was built for.
    Built from a copy in the kernel cache when ``$GPTJ_POPXL_KERNEL_CACHE`` is set, or when the
    source's folder is read-only and holds no current build (see the module docstring)."""
    import cppimport
    identity = _cpu_identity()
    source = _build_source(source, module_name, identity)
    path = os.path.join(os.path.dirname(source), CPU_FILE)
    if _read(path) != identity.encode():
        _write_atomically(path, identity.encode())
    return cppimport.imp_from_filepath(source, module_name)
