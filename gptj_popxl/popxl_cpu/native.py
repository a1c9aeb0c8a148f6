"""Building the C++ kernels for the machine they run on.

The kernels are compiled with ``-march=native`` by cppimport, which rebuilds when the checksum of
a source or of a listed dependency changes, not when the processor does: a checkout or an image
built on one machine would run its cached build on another, and an older processor stops at the
first instruction it lacks (SIGILL). So each kernel lists ``.cpu`` beside its source as a
dependency, and :func:`build` writes this processor's model and features into it first.
"""
import os
import platform

CPU_FILE = ".cpu"


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


def build(source: str, module_name: str):
    """The extension module of the C++ ``source`` (listing ``.cpu`` among its dependencies), built by
    cppimport for this processor: rebuilt when the processor differs from the one it was built for."""
    import cppimport
    path = os.path.join(os.path.dirname(source), CPU_FILE)
    identity = _cpu_identity()
    try:
        with open(path) as f:
            current = f.read() == identity
    except OSError:
        current = False
    if not current:
        scratch = f"{path}.{os.getpid()}"
        try:
            with open(scratch, "w") as f:
                f.write(identity)
            os.replace(scratch, path)  # atomic: a process building at the same time reads one whole file
        except OSError:
            pass  # a folder we may not write: cppimport loads what is there (it could not build either)
    return cppimport.imp_from_filepath(source, module_name)
