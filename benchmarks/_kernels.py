"""Import the repository's kernels for the benchmarks, with or without the package installed.

The kernels import only torch and triton, so a GPU machine needs neither vLLM nor
this project installed: when `attentionpack_vllm.kernels` cannot be imported, the
repository's `kernels/` folder is loaded as a package under another name.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
FALLBACK_NAME = "_attentionpack_kernels"
INSTALLED_NAME = "attentionpack_vllm.kernels"
MODULES = ("layout", "slot_rows", "decode_inputs", "latent_decode_torch", "latent_decode_triton", "dense_paged_triton")
REPO = KERNELS_DIR.parent


def load_from_path(kernels_dir: Path = KERNELS_DIR, name: str = FALLBACK_NAME):
    """Load `kernels_dir` as the package `name` (its relative imports work as usual)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, kernels_dir / "__init__.py", submodule_search_locations=[str(kernels_dir)])
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the kernels package from {kernels_dir}")
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[name]
        raise
    return package


def _import_all(package_name: str) -> dict:
    return {m: importlib.import_module(f"{package_name}.{m}") for m in MODULES}


def load_kernels(from_path: bool = False) -> SimpleNamespace:
    """The kernel modules (`layout`, `decode_inputs`, `latent_decode_torch`,
    `latent_decode_triton`, `dense_paged_triton`) and `source`, where they came from.

    Installed package first; the repository's folder when it is missing (or lacks a
    module, e.g. an older install) or when `from_path` is set.
    """
    if not from_path:
        try:
            modules = _import_all(INSTALLED_NAME)
            where = Path(modules["layout"].__file__).resolve().parent
            return SimpleNamespace(source=f"{INSTALLED_NAME} ({where})", **modules)
        except ModuleNotFoundError as error:
            if not (error.name or "").startswith("attentionpack_vllm"):
                raise  # torch or triton missing: the fallback would fail the same way
    package = load_from_path()
    modules = _import_all(package.__name__)
    return SimpleNamespace(source=f"{package.__name__} ({KERNELS_DIR})", **modules)


def drop_editable_install() -> None:
    """Forget an editable install of this project (tests of the no-install route only)."""
    sys.meta_path[:] = [f for f in sys.meta_path
                        if not type(f).__module__.startswith("__editable__")
                        and not getattr(f, "__module__", "").startswith("__editable__")]
    for name in [n for n in sys.modules if n == "attentionpack_vllm" or n.startswith("attentionpack_vllm.")]:
        del sys.modules[name]


def register_installed_name() -> str:
    """Make `import attentionpack_vllm.kernels` work without installing the project.

    With the package installed nothing changes. Otherwise the repository root goes on
    sys.path (so `attentionpack_vllm` itself imports from the checkout) and `kernels/` is
    loaded under the name `attentionpack_vllm.kernels`, as setup.py would install it.
    Returns where the kernels come from.
    """
    try:
        module = importlib.import_module(INSTALLED_NAME)
        return f"{INSTALLED_NAME} ({Path(module.__file__).resolve().parent})"
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("attentionpack_vllm"):
            raise
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    parent = importlib.import_module("attentionpack_vllm")
    package = load_from_path(KERNELS_DIR, INSTALLED_NAME)
    parent.kernels = package
    return f"{INSTALLED_NAME} loaded from {KERNELS_DIR} (not installed)"
