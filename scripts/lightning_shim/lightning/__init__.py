"""A stand-in ``lightning`` package whose ``fabric`` is notebook_fabric (for scripts/lightning_suite.py only).

``import lightning.fabric.X.Y`` (or ``lightning_fabric.X.Y``) gives notebook_fabric's module of the
same role: the same module object, so a test that monkeypatches it patches notebook_fabric. A
Lightning module with no counterpart here is an empty module. A name a module lacks is a
:class:`Missing` placeholder (a falsy class; what calling it returns raises when used), so a test file
imports and only the tests that use a private Lightning API fail, each with a message naming it.
Never installed, never imported by notebook_fabric itself.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
from typing import Any, Optional

#: Lightning's module path (after ``fabric.``) -> notebook_fabric's; the first matching prefix wins
RENAMES = [
    ("plugins.environments.lightning", "environments.local"),
    ("plugins.environments", "environments"),
    ("plugins.precision.amp", "precision.mixed"),
    ("plugins.precision.double", "precision.true_dtype"),
    ("plugins.precision.half", "precision.true_dtype"),
    ("plugins.precision.precision", "precision.base"),
    ("plugins.precision", "precision"),
    ("plugins.io.torch_io", "checkpoint.io"),
    ("plugins.io", "checkpoint.io"),
    ("loggers.logger", "loggers.base"),
    ("strategies.strategy", "strategies.base"),
    ("strategies.single_xla", "strategies.xla"),
    ("accelerators.accelerator", "accelerators.base"),
    ("utilities.apply_func", "utilities.apply"),
]
#: Lightning's class names where this project spells them otherwise
ALIASES = {
    "environments.local": {"LightningEnvironment": "LocalEnvironment"},
    "environments": {"LightningEnvironment": "LocalEnvironment"},
}
_PREFIXES = ("lightning.fabric", "lightning_fabric")
#: set by lightning_suite_plugin once pytest has collected the tests: calling a placeholder then raises
STRICT_VARIABLE = "LIGHTNING_SHIM_STRICT"


class _MissingMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return missing(f"{cls._lightning_name}.{name}")

    def __bool__(cls) -> bool:
        return False

    def __iter__(cls) -> Any:
        return iter(())

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get(STRICT_VARIABLE) == "1":  # inside a test: say what is missing
            raise NotImplementedError(f"{cls._lightning_name} has no counterpart in notebook_fabric (Lightning's private API)")
        # at collection time (a parametrize list, a skipif): an object that fails when used
        return object.__new__(cls)


class Missing(metaclass=_MissingMeta):
    _lightning_name = "?"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotImplementedError(f"{self._lightning_name} has no counterpart in notebook_fabric (Lightning's private API)")

    def __bool__(self) -> bool:
        return False

    def __iter__(self) -> Any:  # a parametrize list from a missing function: no cases
        return iter(())

    def __repr__(self) -> str:
        return f"<missing {self._lightning_name}>"


_MADE: dict = {}


def missing(name: str) -> type:
    """A placeholder class for Lightning's ``name``; a warning or exception class for such names (the
    tests name them in ``filterwarnings`` and ``pytest.raises``), made once per name."""
    short = name.rsplit(".", 1)[-1]
    if name not in _MADE:
        if short.endswith("Warning"):
            _MADE[name] = type(short, (UserWarning,), {"_lightning_name": name})
        elif short.endswith(("Exception", "Error")):
            _MADE[name] = type(short, (Exception,), {"_lightning_name": name})
        else:
            _MADE[name] = _MissingMeta(short, (Missing,), {"_lightning_name": name})
    return _MADE[name]


def _lenient_getattr(lightning_name: str, module_name: str, is_package: bool):
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if is_package:  # `from package import submodule` asks the package first: never shadow a real submodule
            try:
                return importlib.import_module(f"{module_name}.{name}")
            except ModuleNotFoundError as error:
                if error.name != f"{module_name}.{name}":
                    raise
        return missing(f"{lightning_name}.{name}")

    return __getattr__


def _target(rest: str) -> str:
    for lightning_path, ours in RENAMES:
        if rest == lightning_path or rest.startswith(lightning_path + "."):
            return "notebook_fabric." + ours + rest[len(lightning_path):]
    return "notebook_fabric" + ("." + rest if rest else "")


class _FabricFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if any(fullname == p or fullname.startswith(p + ".") for p in _PREFIXES):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        prefix = next(p for p in _PREFIXES if spec.name == p or spec.name.startswith(p + "."))
        rest = spec.name[len(prefix) + 1:]
        lightning_name = "lightning.fabric" + ("." + rest if rest else "")
        special = _SPECIAL.get(rest)
        if special is not None:
            module = special(spec.name)
        else:
            target = _target(rest)
            try:
                module = importlib.import_module(target)
            except ModuleNotFoundError as error:
                if not (error.name and target.startswith(error.name)):
                    raise
                module = types.ModuleType(spec.name)
                module.__path__ = []
        for lightning_class, ours in ALIASES.get(_target(rest)[len("notebook_fabric."):], {}).items():
            if hasattr(module, ours) and lightning_class not in module.__dict__:
                setattr(module, lightning_class, getattr(module, ours))
        if "__getattr__" not in module.__dict__:
            module.__getattr__ = _lenient_getattr(lightning_name, module.__name__, bool(getattr(module, "__path__", None)))
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def _plugins(name: str) -> types.ModuleType:
    """``lightning.fabric.plugins``: the precision plugins, environments and checkpoint IO together."""
    module = types.ModuleType(name)
    module.__path__ = []
    for source in ("notebook_fabric.precision", "notebook_fabric.environments", "notebook_fabric.checkpoint.io"):
        imported = importlib.import_module(source)
        for key in getattr(imported, "__all__", [k for k in vars(imported) if not k.startswith("_")]):
            setattr(module, key, getattr(imported, key))
    return module


def _imports(name: str) -> types.ModuleType:
    """``lightning.fabric.utilities.imports``: the version flags, computed here."""
    import platform

    import torch
    from packaging.version import Version

    module = types.ModuleType(name)
    torch_version = Version(torch.__version__.split("+")[0])
    for minor in range(1, 12):
        setattr(module, f"_TORCH_GREATER_EQUAL_2_{minor}", torch_version >= Version(f"2.{minor}"))
        setattr(module, f"_TORCH_LESS_EQUAL_2_{minor}", torch_version <= Version(f"2.{minor}.99"))
    for minor in range(8, 15):
        setattr(module, f"_PYTHON_GREATER_EQUAL_3_{minor}_0", sys.version_info >= (3, minor))
    module._IS_WINDOWS = platform.system() == "Windows"
    module._IS_INTERACTIVE = hasattr(sys, "ps1") or bool(sys.flags.interactive)
    try:
        import torchmetrics  # noqa: F401

        module._TORCHMETRICS_GREATER_EQUAL_1_0_0 = True
    except ImportError:
        module._TORCHMETRICS_GREATER_EQUAL_1_0_0 = False
    return module


def _testing(name: str) -> types.ModuleType:
    """``lightning.fabric.utilities.testing``: ``_runif_reasons`` for the tests' ``RunIf``."""
    module = types.ModuleType(name)
    module.__path__ = []
    module._runif_reasons = runif_reasons
    return module


def _distributed(name: str) -> types.ModuleType:
    """``lightning.fabric.utilities.distributed``: what Lightning's conftest calls between tests."""
    import torch.distributed as dist

    module = types.ModuleType(name)

    def _destroy_dist_connection() -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    module._destroy_dist_connection = _destroy_dist_connection
    module._distributed_is_initialized = lambda: dist.is_available() and dist.is_initialized()
    return module


_SPECIAL = {"plugins": _plugins, "utilities.imports": _imports, "utilities.testing": _testing,
            "utilities.distributed": _distributed}


def runif_reasons(*, min_cuda_gpus: int = 0, min_torch: Optional[str] = None, max_torch: Optional[str] = None,
                  min_python: Optional[str] = None, bf16_cuda: bool = False, tpu: bool = False, mps: Optional[bool] = None,
                  skip_windows: bool = False, standalone: bool = False, deepspeed: bool = False,
                  dynamo: bool = False, linux_only: bool = False, **others: Any) -> tuple[list[str], dict]:
    """Why a test marked ``RunIf(...)`` cannot run here (empty: it runs)."""
    import platform

    import torch
    from packaging.version import Version

    reasons = []
    version = Version(torch.__version__.split("+")[0])
    if min_cuda_gpus and torch.cuda.device_count() < min_cuda_gpus:
        reasons.append(f"GPUs>={min_cuda_gpus}")
    if bf16_cuda and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
        reasons.append("bf16 CUDA")
    if min_torch and version < Version(min_torch):
        reasons.append(f"torch>={min_torch}")
    if max_torch and version >= Version(max_torch):
        reasons.append(f"torch<{max_torch}")
    if min_python and sys.version_info < tuple(int(p) for p in min_python.split(".")):
        reasons.append(f"python>={min_python}")
    if tpu:
        reasons.append("TPU")
    if mps is not None and mps != (torch.backends.mps.is_available()):
        reasons.append("MPS" if mps else "no MPS")
    if skip_windows and platform.system() == "Windows":
        reasons.append("not Windows")
    if linux_only and platform.system() != "Linux":
        reasons.append("Linux")
    if standalone and os.environ.get("PL_RUN_STANDALONE_TESTS", "0") != "1":
        reasons.append("standalone (PL_RUN_STANDALONE_TESTS=1)")
    if deepspeed and importlib.util.find_spec("deepspeed") is None:
        reasons.append("deepspeed")
    if dynamo and not hasattr(torch, "compile"):
        reasons.append("torch.dynamo")
    reasons.extend(f"unknown RunIf({key}=)" for key in others if others[key])
    return reasons, {}


sys.meta_path.insert(0, _FabricFinder())
fabric = importlib.import_module("lightning.fabric")
