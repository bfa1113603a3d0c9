"""The locks (requirements/*.txt): what `make install`, CI and the image install, one exact version per
package. They must pin everything, stay inside pyproject.toml's ranges, agree with each other, and be what
the running environment holds."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import ROOT

LOCKS = {flavour: ROOT / "requirements" / f"{flavour}.txt" for flavour in ("cpu", "cuda")}
CHECK_LOCK = ROOT / "scripts" / "check_lock.py"
TORCH_CUDA_RUNTIME = ("nvidia-", "cuda-", "triton")  # what PyPI's CUDA build of torch brings on top


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_lock", CHECK_LOCK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_lock = _load_checker()


def pyproject_requirements() -> list[Requirement]:
    """The dependencies and every extra's, as pyproject.toml declares them."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared += extra
    return [Requirement(text) for text in declared]


@pytest.mark.parametrize("flavour", sorted(LOCKS))
def test_each_lock_pins_every_dependency_inside_pyproject_ranges(flavour) -> None:
    pins = check_lock.read_lock(LOCKS[flavour])
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is declared in pyproject.toml but missing from {flavour}.txt: run `make lock`"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{flavour}.txt has {name}=={pins[name]}, outside pyproject.toml's {requirement}: run `make lock`"
        )
    assert "pip" in pins and "setuptools" in pins  # installs and the package's build resolve the same way


def test_the_cpu_lock_has_the_cpu_torch_and_the_cuda_lock_pypis() -> None:
    cpu, cuda = (check_lock.read_lock(LOCKS[flavour]) for flavour in ("cpu", "cuda"))
    assert Version(cpu["torch"]).local == "cpu"
    assert Version(cuda["torch"]).local is None and Version(cuda["torch"]).public == Version(cpu["torch"]).public
    assert any(name.startswith("nvidia-") for name in cuda)


def test_the_locks_agree_on_every_package_they_share() -> None:
    cpu, cuda = (check_lock.read_lock(LOCKS[flavour]) for flavour in ("cpu", "cuda"))
    assert {name: cpu[name] for name in cpu.keys() & cuda.keys() if cpu[name] != cuda[name]}.keys() == {"torch"}
    assert cpu.keys() <= cuda.keys()
    assert all(name.startswith(TORCH_CUDA_RUNTIME) for name in cuda.keys() - cpu.keys())


def test_read_lock_refuses_a_line_that_is_not_one_exact_pin(tmp_path) -> None:
    for line in ("numpy>=2", "numpy", "numpy==2.0,<3"):
        lock = tmp_path / "lock.txt"
        lock.write_text(f"# a comment\nfastapi==0.1  # via taskmoe\n{line}\n")
        with pytest.raises(ValueError, match=r"lock\.txt:3"):
            check_lock.read_lock(lock)


def test_differences_name_each_kind_of_mismatch() -> None:
    locked = {"a": "1.0", "b": "2.0", "torch": "2.13.0+cpu", "gone": "1"}
    installed = {"a": "1.0", "b": "2.1", "torch": "2.13.0", "extra": "3"}
    assert check_lock.differences(locked, installed) == [
        "b: the lock has 2.0, 2.1 is installed",
        "extra==3 is installed but not in the lock",
        "gone==1 is in the lock but not installed",
        "torch: the lock has 2.13.0+cpu, 2.13.0 is installed",  # a build label is part of the version
    ]
    assert check_lock.differences(locked, dict(locked)) == []


def _run_checker(lock) -> subprocess.CompletedProcess:
    command = [sys.executable, str(CHECK_LOCK), str(lock)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


needs_project_venv = pytest.mark.skipif(
    sys.prefix != str(ROOT / ".venv"), reason="runs in the environment `make install` made from the lock"
)


@needs_project_venv
def test_this_environment_is_exactly_the_cpu_lock() -> None:
    done = _run_checker(LOCKS["cpu"])
    assert done.returncode == 0, done.stderr


@needs_project_venv
def test_the_checker_fails_on_an_environment_that_differs(tmp_path) -> None:
    text = LOCKS["cpu"].read_text()
    pins = check_lock.read_lock(LOCKS["cpu"])
    lock = tmp_path / "lock.txt"
    lock.write_text(text.replace(f"\nnumpy=={pins['numpy']}\n", "\nnumpy==1.0.0\n"))
    done = _run_checker(lock)
    assert done.returncode == 1 and f"numpy: the lock has 1.0.0, {pins['numpy']} is installed" in done.stderr
