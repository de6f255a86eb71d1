"""What an install holds: every package folder of the checkout is listed in pyproject.toml (a folder left out
works from the checkout and is missing from a wheel), and train/ and demo/ install under rwkv_lm, not as
top-level packages of site-packages."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"rwkv_lm": ROOT / "rwkv_lm", "rwkv_lm.train": ROOT / "train", "rwkv_lm.demo": ROOT / "demo"}


def _listed() -> tuple[list[str], dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return config["packages"], config["package-dir"]


def test_every_package_folder_is_listed():
    packages, _ = _listed()
    found = set()
    for name, folder in FOLDERS.items():
        for init in folder.rglob("__init__.py"):
            found.add(".".join([name, *init.parent.relative_to(folder).parts]))
    missing = sorted(found - set(packages))
    assert not missing, f"package folders missing from pyproject.toml's [tool.setuptools] packages: {missing}"


def test_train_and_demo_install_under_rwkv_lm():
    packages, package_dir = _listed()
    assert all(p == "rwkv_lm" or p.startswith("rwkv_lm.") for p in packages)
    assert package_dir == {"rwkv_lm.train": "train", "rwkv_lm.demo": "demo"}
